//! [`BrokerAuthLayer`]: the same as the middleware, for `tower` services of `http::Request`.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use http_body_util::{Either, Empty, Full, combinators::BoxBody, combinators::UnsyncBoxBody};
use tower_layer::Layer;
use tower_service::Service;

use crate::{BrokerClient, Error};

/// A request body that may be sent a second time (after a 401), if it can be copied.
///
/// Implemented for the buffered bodies (`Full`, `Empty`, `String`, `Bytes`, `Vec<u8>`, `()`
/// — copies share their bytes where the type allows) and, answering `None`, for boxed bodies,
/// which may be streams. Implement it for your own body type to say whether it can be replayed.
pub trait ReplayBody: Sized {
    /// A copy to send again, or `None` if the body cannot be replayed.
    fn try_clone_body(&self) -> Option<Self>;
}

impl<D: Buf + Clone> ReplayBody for Full<D> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D> ReplayBody for Empty<D> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(Empty::new())
    }
}

impl ReplayBody for String {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayBody for Bytes {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayBody for Vec<u8> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayBody for () {
    fn try_clone_body(&self) -> Option<Self> {
        Some(())
    }
}

impl<D, E> ReplayBody for BoxBody<D, E> {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

impl<D, E> ReplayBody for UnsyncBoxBody<D, E> {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

impl<L: ReplayBody, R: ReplayBody> ReplayBody for Either<L, R> {
    fn try_clone_body(&self) -> Option<Self> {
        match self {
            Either::Left(l) => l.try_clone_body().map(Either::Left),
            Either::Right(r) => r.try_clone_body().map(Either::Right),
        }
    }
}

/// A `tower` layer that authorises every request with a token of one account and performs
/// the 401 dance (see the crate docs) around an HTTP client service (e.g. hyper-util's
/// `Client`).
///
/// The wrapped service must be `Clone` (the retry goes through a clone made ready again) and
/// the request body must implement [`ReplayBody`]: a retry happens only when
/// [`ReplayBody::try_clone_body`] gives a copy; a streamed body's 401 is handed back after the
/// token was reported. Errors are [`BrokerAuthError`]: the broker's, or the service's.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use bace_token_broker_client::{BrokerAuthLayer, BrokerClient};
/// use bytes::Bytes;
/// use http_body_util::Empty;
/// use hyper_util::{client::legacy::Client, rt::TokioExecutor};
/// use tower::{Layer, Service, ServiceExt};
///
/// let broker = BrokerClient::new("http://token-broker:50051")?;
/// let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
/// let mut api = BrokerAuthLayer::new(broker, "fleet-a").layer(http);
/// let request = http::Request::get("http://bace.example/api/v2/physical-device")
///     .body(Empty::new())?;
/// let response = api.ready().await?.call(request).await?;
/// println!("{}", response.status());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct BrokerAuthLayer {
    client: BrokerClient,
    account: Arc<str>,
}

impl BrokerAuthLayer {
    /// Authorises requests with tokens of `account` from `client`.
    pub fn new(client: BrokerClient, account: impl Into<Arc<str>>) -> Self {
        Self {
            client,
            account: account.into(),
        }
    }
}

impl<S> Layer<S> for BrokerAuthLayer {
    type Service = BrokerAuth<S>;

    fn layer(&self, inner: S) -> BrokerAuth<S> {
        BrokerAuth {
            inner,
            client: self.client.clone(),
            account: self.account.clone(),
        }
    }
}

/// The service [`BrokerAuthLayer`] makes.
#[derive(Clone, Debug)]
pub struct BrokerAuth<S> {
    inner: S,
    client: BrokerClient,
    account: Arc<str>,
}

/// The error of a [`BrokerAuth`] service.
#[derive(Debug)]
pub enum BrokerAuthError<E> {
    /// No token for the request: what the broker answered.
    Broker(Error),
    /// The wrapped service failed.
    Service(E),
}

impl<E: fmt::Display> fmt::Display for BrokerAuthError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerAuthError::Broker(e) => write!(f, "no BACE token: {e}"),
            BrokerAuthError::Service(e) => e.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for BrokerAuthError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BrokerAuthError::Broker(e) => Some(e),
            BrokerAuthError::Service(e) => Some(e),
        }
    }
}

impl<S, B, RB> Service<Request<B>> for BrokerAuth<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    B: ReplayBody + Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BrokerAuthError<S::Error>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(BrokerAuthError::Service)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The instance polled ready serves this call; the one left behind is a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let client = self.client.clone();
        let account = self.account.clone();
        Box::pin(async move {
            let token = super::token(&client, &account)
                .await
                .map_err(BrokerAuthError::Broker)?;
            let replay = copy(&request);
            request
                .headers_mut()
                .insert(AUTHORIZATION, token.authorization().clone());
            let response = inner
                .call(request)
                .await
                .map_err(BrokerAuthError::Service)?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            let retry = Box::pin(super::retry_token(&client, &account, &token)).await;
            let Some(new) = retry else {
                return Ok(response);
            };
            let Some(mut replay) = replay else {
                tracing::debug!(account = %account, "not retried: the request body cannot be replayed");
                return Ok(response);
            };
            replay
                .headers_mut()
                .insert(AUTHORIZATION, new.authorization().clone());
            drop(response);
            std::future::poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(BrokerAuthError::Service)?;
            inner.call(replay).await.map_err(BrokerAuthError::Service)
        })
    }
}

/// A copy of `request` to send again, if its body can be replayed. Extensions are copied too.
fn copy<B: ReplayBody>(request: &Request<B>) -> Option<Request<B>> {
    let body = request.body().try_clone_body()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    Some(copy)
}
