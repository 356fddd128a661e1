//! Wires the pieces into a running server: broker, refresher, warm-up, the gRPC services
//! (token broker, health, reflection) and the shutdown sequence. The only module that knows all
//! the others.
//!
//! Build first, spawn later: every part is built (and a bad TLS or auth setup refused) before
//! any task starts. One shutdown sequence, whether a signal or a failure ends the run:
//! readiness goes NOT_SERVING, the server stops accepting and drains in-flight RPCs for at most
//! `shutdown_grace`, then background work stops.

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context;
use tokio::{net::TcpListener, sync::oneshot};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::{
    auth::Authorizer,
    broker::Broker,
    config::Config,
    grpc::TokenBrokerApi,
    proto::{self, token_broker_service_server::TokenBrokerServiceServer},
    reload::{ReloadCounts, Reloader},
    store::Store,
    telemetry,
    tls::{self, TlsAcceptor},
    upstream::{HttpUpstream, Upstream},
};

/// The readiness service name: SERVING once warm-up ran, NOT_SERVING on shutdown.
pub const READINESS_SERVICE: &str =
    <TokenBrokerServiceServer<TokenBrokerApi> as NamedService>::NAME;

/// HTTP/2 connection window of the gRPC server (bytes).
const HTTP2_CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// Concurrent calls one client connection may have open; more wait at the client.
const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 4096;

/// The sockets the broker serves on.
pub struct Listeners {
    /// The gRPC server's.
    pub grpc: TcpListener,
    /// The metrics endpoint's, if on.
    pub metrics: Option<TcpListener>,
    /// The plaintext health-only server's (with TLS on).
    pub health: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses `config` names.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let grpc = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (metrics_listen)"))?,
            ),
            None => None,
        };
        let health =
            match config.tls {
                Some(_) => Some(TcpListener::bind(config.health_listen).await.with_context(
                    || format!("cannot listen on {} (health_listen)", config.health_listen),
                )?),
                None => None,
            };
        Ok(Self {
            grpc,
            metrics,
            health,
        })
    }
}

/// Runs the broker for `config` on `listeners` until `shutdown` resolves, talking to BACE
/// over HTTP.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let upstream = HttpUpstream::new(&config.upstream).context("building the HTTP client")?;
    serve_with(config, listeners, Arc::new(upstream), shutdown).await
}

/// [`serve`] with any [`Upstream`].
pub async fn serve_with(
    config: Config,
    listeners: Listeners,
    upstream: Arc<dyn Upstream>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = listeners.grpc;
    let addr: SocketAddr = listener.local_addr()?;
    // The shared store, if configured: built here (a bad key file was refused when the config
    // was read), connected lazily, so a replica starts while Redis is unreachable.
    let store = config
        .store
        .as_ref()
        .map(|s| Store::new(&s.redis))
        .transpose()
        .context("setting up the store (store.redis)")?;
    let (broker, refresher) = Broker::with_store(&config, upstream, store);
    // The broker holds the accounts now; keep only the rest of the config (with 100,000
    // accounts, each copy of them costs tens of megabytes).
    let mut config = config;
    let account_count = config.accounts.len();
    config.accounts.clear();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(READINESS_SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let acceptor = config.tls.as_ref().map(TlsAcceptor::new).transpose()?;
    let authorizer = config.auth.clone().map(Authorizer::new).transpose()?;
    if authorizer.is_none() {
        warn!(
            "no `auth` configured: any caller that reaches the port may fetch every account's token"
        );
    }
    let api = TokenBrokerApi::new(broker.clone(), authorizer.clone());
    let reloads = Arc::new(ReloadCounts::default());

    // Everything is built; from here on, background work is spawned, and all of it ends
    // through the one shutdown sequence below.
    let stopping = CancellationToken::new();
    // Reloads stop first: nothing is applied once the shutdown has begun.
    let reloads_stop = stopping.child_token();
    let metrics_server = match listeners.metrics {
        Some(metrics_listener) => {
            let metrics_addr = metrics_listener.local_addr()?;
            info!(addr = %metrics_addr, "metrics listening (GET /metrics)");
            let registry = telemetry::Sources {
                broker: broker.clone(),
                calls: api.calls(),
                auth: authorizer.clone(),
                reloads: reloads.clone(),
            }
            .registry();
            let stop = stopping.clone();
            Some(tokio::spawn(telemetry::serve(
                metrics_listener,
                registry,
                async move { stop.cancelled().await },
            )))
        }
        None => None,
    };
    let health_server = match listeners.health {
        Some(health_listener) => {
            info!(addr = %health_listener.local_addr()?, "plaintext health service listening (for probes)");
            let stop = stopping.clone();
            let server = tonic::transport::Server::builder()
                .add_service(health_service.clone())
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(health_listener),
                    async move { stop.cancelled().await },
                );
            Some(tokio::spawn(server))
        }
        None => None,
    };
    let reloader = Reloader::new(
        config.clone(),
        broker.clone(),
        acceptor.clone(),
        authorizer,
        reloads,
        api.calls(),
    )
    .map(|reloader| tokio::spawn(reloader.run(reloads_stop.clone())));
    let mut refresher = tokio::spawn(refresher.run());
    // Adopts other replicas' tokens and reconciles; ends with the broker (no store: at once).
    let store_sync = tokio::spawn(broker.clone().sync_with_store());
    let warm_up = tokio::spawn(warm_up(broker.clone(), health.clone()));

    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // h2 answers a burst of small buffered DATA frames beyond half the connection window
        // with GOAWAY (flood protection). A large window and a bound on concurrent streams
        // per connection keep a client's burst of thousands of calls well inside it.
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(TokenBrokerServiceServer::new(api));
    let drained = async {
        let _ = drain_rx.await;
    };
    let mut server = match acceptor {
        Some(acceptor) => tokio::spawn(
            router.serve_with_incoming_shutdown(tls::incoming(listener, acceptor), drained),
        ),
        None => tokio::spawn(
            router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), drained),
        ),
    };
    info!(%addr, tls = config.tls.is_some(), accounts = account_count, "broker listening");
    if let Some(store) = broker.store() {
        info!(prefix = store.prefix(), lease = ?store.lease_duration(), "sharing tokens with the other replicas through Redis (store.redis)");
    }

    // Runs until a shutdown signal, or until the server or the refresher stops on its own
    // (without the refresher no token would be kept fresh: fail loudly, and restart).
    let mut server_done = false;
    let mut refresher_done = false;
    let failure = tokio::select! {
        result = &mut server => {
            server_done = true;
            Some(match result {
                Ok(Ok(())) => anyhow::anyhow!("the gRPC server stopped unexpectedly"),
                Ok(Err(e)) => anyhow::Error::new(e).context("gRPC server"),
                Err(e) => anyhow::Error::new(e).context("gRPC server task"),
            })
        }
        _ = &mut refresher => {
            refresher_done = true;
            Some(anyhow::anyhow!("the refresh scheduler stopped unexpectedly"))
        }
        () = shutdown => None,
    };

    // The one shutdown sequence: readiness off, streams end, in-flight RPCs drain for at most
    // `shutdown_grace`, then fetches and the refresher stop, then the side servers.
    match &failure {
        Some(error) => tracing::error!(error = %format!("{error:#}"), "stopping"),
        None => {
            info!(grace = %humantime::format_duration(config.shutdown_grace), "shutting down: readiness off, draining")
        }
    }
    reloads_stop.cancel();
    warm_up.abort();
    // Wait for the abort, so a warm-up ending right now cannot flip readiness back on.
    let _ = warm_up.await;
    set_ready(&health, false).await;
    broker.drain();
    let _ = drain_tx.send(());
    let mut result = failure.map_or(Ok(()), Err);
    if !server_done {
        match tokio::time::timeout(config.shutdown_grace, &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                result = result.and(Err(anyhow::Error::new(e).context("gRPC server")))
            }
            Ok(Err(e)) => result = result.and(Err(anyhow::Error::new(e).context("server task"))),
            Err(_) => {
                warn!("drain grace elapsed with RPCs still in flight; closing them");
                server.abort();
            }
        }
    }
    broker.shutdown().await;
    let _ = store_sync.await;
    if !refresher_done {
        let _ = refresher.await;
    }
    stopping.cancel();
    // These end with `stopping`; a client holding a stream open (health Watch) must not keep
    // the process alive.
    finish(metrics_server).await;
    finish(health_server).await;
    finish(reloader).await;
    if result.is_ok() {
        info!("stopped");
    }
    result
}

/// Waits a moment for a side server told to stop, then aborts it (a client holding a health
/// Watch stream open must not keep the process alive).
async fn finish<T>(task: Option<tokio::task::JoinHandle<T>>) {
    if let Some(task) = task {
        let abort = task.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(1), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

async fn warm_up(broker: Broker, health: HealthReporter) {
    let report = broker.warm_up().await;
    info!(
        ready = report.ready,
        from_store = report.from_store,
        failed = report.failed,
        "warm-up done; ready"
    );
    set_ready(&health, true).await;
}

async fn set_ready(health: &HealthReporter, ready: bool) {
    let status = if ready {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    health.set_service_status(READINESS_SERVICE, status).await;
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("SIGINT received"),
        () = term => info!("SIGTERM received"),
    }
}
