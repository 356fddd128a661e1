//! Live reload: on SIGHUP, and when the config file or a secret file it names changes, the
//! config is read and validated again and its accounts applied to the broker
//! ([`Broker::apply`]). A config that fails validation is rejected whole: the running one
//! keeps serving; the error is logged and counted.
//!
//! Kubernetes updates a mounted ConfigMap or Secret by swapping a `..data` symlink in the
//! mount directory, so the reloader watches directories (not files) and reacts to changes of
//! the files it knows and of `..`-prefixed entries. Bursts of events are coalesced.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::{sync::mpsc, time::Duration};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    auth::Authorizer, broker::Broker, config::Config, counts::Counts, grpc::CallCounts,
    tls::TlsAcceptor,
};

/// Events closer together than this are one change.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Reloads by outcome: `ok` (accounts changed), `unchanged`, `rejected` (the running config
/// stays). Shared (`Arc`) by the reloader and telemetry.
#[derive(Debug, Default)]
pub struct ReloadCounts(Counts<&'static str>);

impl ReloadCounts {
    fn count(&self, outcome: &'static str) {
        self.0.inc(outcome);
    }

    /// Reloads so far, by outcome.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.0.snapshot()
    }
}

/// Watches and applies configuration changes for one broker.
pub struct Reloader {
    broker: Broker,
    counts: Arc<ReloadCounts>,
    /// The gRPC service's call counts: the series of removed accounts are dropped.
    calls: Arc<CallCounts>,
    /// The TLS acceptor to hand rotated certificates to, when TLS is on.
    tls: Option<TlsAcceptor>,
    /// The authorizer to hand a new allow list and keys to, when auth is on.
    auth: Option<Authorizer>,
    /// The config the process started with: keys outside `accounts` stay as they were.
    startup: Config,
    path: PathBuf,
    /// Files whose change triggers a reload: the config and the secret files it names.
    files: BTreeSet<PathBuf>,
}

impl Reloader {
    /// A reloader for `config` (which must come from [`Config::load`]; `None` otherwise),
    /// counting its outcomes in `counts` (and dropping removed accounts' series from `calls`).
    pub fn new(
        config: Config,
        broker: Broker,
        tls: Option<TlsAcceptor>,
        auth: Option<Authorizer>,
        counts: Arc<ReloadCounts>,
        calls: Arc<CallCounts>,
    ) -> Option<Self> {
        let path = config.path.clone()?;
        let files = watched_files(&config);
        Some(Self {
            broker,
            counts,
            calls,
            tls,
            auth,
            startup: config,
            path,
            files,
        })
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(mut self, stop: CancellationToken) {
        let (tx, mut changes) = mpsc::unbounded_channel::<PathBuf>();
        let mut watcher =
            match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Reading a file is an event too (inotify's open and close-without-write):
                // a reload that reads the config would trigger the next one, forever.
                if let Ok(event) = event
                    && !matches!(event.kind, notify::EventKind::Access(_))
                {
                    for path in event.paths {
                        let _ = tx.send(path);
                    }
                }
            }) {
                Ok(w) => Some(w),
                Err(error) => {
                    warn!(%error, "cannot watch config files; reload on SIGHUP only");
                    None
                }
            };
        let mut watched = BTreeSet::new();
        if let Some(w) = watcher.as_mut() {
            self.watch(w, &mut watched);
        }
        let mut hangup = hangup_signal();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = hangup.recv() => {
                    info!("SIGHUP received: reloading the config");
                    self.reload();
                }
                Some(path) = changes.recv() => {
                    if !self.is_relevant(&path) {
                        continue;
                    }
                    // Coalesce the burst (a symlink swap is several events).
                    tokio::time::sleep(DEBOUNCE).await;
                    while changes.try_recv().is_ok() {}
                    debug!(path = %path.display(), "config or secret file changed");
                    self.reload();
                }
            }
            if let Some(w) = watcher.as_mut() {
                self.watch(w, &mut watched);
            }
        }
    }

    /// Reads, validates and applies the config file once: every section is prepared first
    /// (files read, certificates, keys and the allow list checked), and only when all of them
    /// are good is any of it applied. A rejected reload changes nothing.
    pub fn reload(&mut self) {
        let config = match Config::load(&self.path) {
            Ok(config) => config,
            Err(error) => {
                warn!(%error, "config reload rejected; the running config stays");
                self.counts.count("rejected");
                return;
            }
        };
        let tls = match (&self.tls, &config.tls) {
            (Some(acceptor), Some(tls)) => match acceptor.prepare(tls) {
                Ok(prepared) => Some(prepared),
                Err(error) => {
                    warn!(%error, "config reload rejected (tls); the running config stays");
                    self.counts.count("rejected");
                    return;
                }
            },
            _ => None,
        };
        let auth = match (&self.auth, &config.auth) {
            (Some(authorizer), Some(auth)) => match authorizer.prepare(auth.clone()) {
                Ok(prepared) => Some(prepared),
                Err(error) => {
                    warn!(%error, "config reload rejected (auth); the running config stays");
                    self.counts.count("rejected");
                    return;
                }
            },
            _ => None,
        };
        // Everything is good: apply it all.
        if let Some(tls) = tls {
            tls.commit();
        }
        if let Some(auth) = auth {
            auth.commit();
        }
        let restart = self.startup.restart_only_changes(&config);
        if !restart.is_empty() {
            warn!(keys = ?restart, "these settings changed but apply only after a restart");
        }
        let report = self.broker.apply(&config);
        self.calls.forget(&report.removed);
        let names =
            |v: &[crate::token::AccountName]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        if report.any_change() {
            info!(
                added = ?names(&report.added),
                removed = ?names(&report.removed),
                changed = ?names(&report.changed),
                unchanged = report.unchanged.len(),
                "config reloaded"
            );
            self.counts.count("ok");
        } else {
            info!("config reloaded: no account changed");
            self.counts.count("unchanged");
        }
        self.files = watched_files(&config);
    }

    /// A change of `path` concerns the config when it is one of the watched files, or a
    /// Kubernetes `..data` entry in one of their directories.
    fn is_relevant(&self, path: &Path) -> bool {
        self.files.contains(path)
            || (path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".."))
                && path
                    .parent()
                    .is_some_and(|dir| self.files.iter().any(|f| f.parent() == Some(dir))))
    }

    /// Watches the directories of the current files (adding new ones; old ones stay watched).
    fn watch(&self, watcher: &mut RecommendedWatcher, watched: &mut BTreeSet<PathBuf>) {
        for file in &self.files {
            let Some(dir) = file.parent() else { continue };
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if watched.contains(dir) {
                continue;
            }
            match watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir.to_owned());
                }
                Err(error) => warn!(%error, dir = %dir.display(), "cannot watch directory"),
            }
        }
    }
}

fn watched_files(config: &Config) -> BTreeSet<PathBuf> {
    config
        .path
        .iter()
        .chain(&config.secret_files)
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .collect()
}

/// SIGHUP; never fires where there are no signals.
fn hangup_signal() -> HangUp {
    #[cfg(unix)]
    let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    let signal = None;
    HangUp(signal)
}

#[cfg(unix)]
struct HangUp(Option<tokio::signal::unix::Signal>);
#[cfg(not(unix))]
struct HangUp(Option<std::convert::Infallible>);

impl HangUp {
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = self.0.as_mut()
            && signal.recv().await.is_some()
        {
            return;
        }
        std::future::pending::<()>().await
    }
}
