//! Pure-Rust upstream client: pooled keep-alive HTTP/1.1 to the backends, streamed response bodies.
//!
//! Invariants: the idle pool is unbounded per backend, so concurrency is never capped by the pool
//! (every in-flight request owns a connection, idle ones are reused); a response body is read frame
//! by frame and never buffered whole unless the caller asks for it; dropping a `Response` or
//! aborting its `BodyReader` before the end closes that connection instead of returning it.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Body;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::errors::{Error, Phase, Result};

/// The four limits of one upstream exchange.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect to the backend.
    pub connect: Duration,
    /// From sending the request to the response's status line (time to first token for streams).
    pub first_byte: Duration,
    /// Longest silence between two body chunks.
    pub idle: Duration,
    /// The whole exchange, body included.
    pub total: Duration,
}

/// Headers that describe one hop, not the message, and so are never forwarded (RFC 9110 §7.6.1);
/// `host` and `content-length` are recomputed for the upstream hop.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
            | "expect"
    )
}

/// Dials a backend: TCP, then TLS for `https://`, the two bounded together by the connect timeout
/// (a TLS handshake that stalls is a failed connect: nothing was sent, another backend may serve).
#[derive(Clone)]
struct Dialer {
    inner: HttpsConnector<HttpConnector>,
    limit: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Dialer {
    type Response = <HttpsConnector<HttpConnector> as tower_service::Service<Uri>>::Response;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let limit = self.limit;
        let dial = self.inner.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(limit, dial).await {
                Ok(done) => done,
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect (TCP and TLS) took over {} ms", limit.as_millis()),
                )) as BoxError),
            }
        })
    }
}

/// A pooled client shared by every request of the process; one pool per scheme and authority.
pub struct Upstream {
    client: Client<Dialer, Full<Bytes>>,
    timeouts: Timeouts,
}

impl Upstream {
    /// A client for `http://` and `https://` backends; `tls` says whom `https://` trusts.
    pub fn new(timeouts: Timeouts, pool_idle_timeout: Duration, tls: rustls::ClientConfig) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(timeouts.connect));
        tcp.set_keepalive(Some(Duration::from_secs(60)));
        tcp.enforce_http(false);
        let connector = Dialer {
            inner: HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .wrap_connector(tcp),
            limit: timeouts.connect,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(pool_idle_timeout)
            // NOTE: a capped idle pool smaller than the client concurrency makes every burst
            // reconnect (nginx loses 60% of its throughput that way): keep them all.
            .pool_max_idle_per_host(usize::MAX)
            .build(connector);
        Self { client, timeouts }
    }

    /// Build an upstream request from the client's method, headers and untouched body bytes.
    pub fn build_request(
        method: &str,
        url: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| Error::InvalidArgument(format!("invalid HTTP method {method:?}")))?;
        let uri: Uri = url
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("invalid upstream URL {url:?}: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(Error::InvalidArgument(format!(
                "upstream URL {url:?} must start with http:// or https://"
            )));
        }
        let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
            return Err(Error::InvalidArgument(format!(
                "upstream URL {url:?} has no host"
            )));
        };
        // `Host` is always the backend's authority (never the client's, which is hop-by-hop here),
        // without any user-info the URL may carry.
        let host = match uri.port_u16() {
            Some(port) => HeaderValue::from_str(&format!("{host}:{port}")),
            None => HeaderValue::from_str(host),
        }
        .map_err(|_| Error::InvalidArgument(format!("invalid upstream host in {url:?}")))?;
        let mut map = HeaderMap::with_capacity(headers.len() + 1);
        for (name, value) in headers {
            let lower = name.to_ascii_lowercase();
            if is_hop_by_hop(&lower) {
                continue;
            }
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(lower.as_bytes()),
                HeaderValue::from_str(value),
            ) else {
                // A header we cannot re-encode is dropped rather than failing the request.
                continue;
            };
            map.append(name, value);
        }
        map.insert(hyper::header::HOST, host);
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = map;
        Ok(request)
    }

    /// Send the request and wait for the status line and headers (bounded by the first-byte and
    /// total timeouts); the body is left to the returned reader.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response> {
        let authority = endpoint(request.uri());
        let start = Instant::now();
        let deadline = start + self.timeouts.total;
        let wait = self.timeouts.first_byte.min(self.timeouts.total);
        let response = match tokio::time::timeout(wait, self.client.request(request)).await {
            Err(_) => {
                let phase = if self.timeouts.first_byte <= self.timeouts.total {
                    Phase::FirstByte
                } else {
                    Phase::Total
                };
                return Err(Error::Timeout { authority, phase });
            }
            Ok(Err(err)) => return Err(classify(&authority, &err)),
            Ok(Ok(response)) => response,
        };
        let (parts, body) = response.into_parts();
        let headers = parts
            .headers
            .iter()
            .filter(|(name, _)| !is_hop_by_hop(name.as_str()))
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        Ok(Response {
            status: parts.status.as_u16(),
            headers,
            body: BodyReader {
                body: Some(body),
                first_byte_deadline: Some(start + wait),
                deadline,
                idle: self.timeouts.idle,
                authority,
                abort: Arc::new(Abort::default()),
                failed: None,
            },
        })
    }
}

/// `host:port` of a URL, as errors name a backend (no user-info: it may hold a password).
pub fn endpoint(uri: &Uri) -> String {
    let host = uri.host().unwrap_or_default();
    match uri.port_u16() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// Turn hyper's error into ours: a failed connect is the only failure where nothing was sent.
fn classify(authority: &str, err: &hyper_util::client::legacy::Error) -> Error {
    let authority = authority.to_owned();
    if err.is_connect() {
        return Error::Connect {
            authority,
            reason: root_cause(err),
        };
    }
    Error::Protocol {
        authority,
        reason: root_cause(err),
    }
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Status line and headers of an upstream answer, and the reader of its body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: BodyReader,
}

/// Lets another thread stop a body read that is waiting for the backend.
#[derive(Default)]
pub struct Abort {
    flag: AtomicBool,
    notify: Notify,
}

impl Abort {
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Run `work` unless the abort fires first (then `None`; `work` is dropped).
    ///
    /// NOTE: the `Notified` future is created and enabled *before* the flag is checked, so a
    /// `trigger()` landing between the check and the wait is never lost (`notify_waiters` only
    /// wakes waiters that already exist; checking first left a window where it woke nobody).
    pub async fn unless_triggered<F: Future>(&self, work: F) -> Option<F::Output> {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_set() {
            return None;
        }
        tokio::select! {
            biased;
            () = notified => None,
            out = work => Some(out),
        }
    }
}

/// `next_ready` looks for more chunks only when the first one came this fast (it was already
/// there: a burst), not when it had to be waited for.
const JOIN_AFTER_WAIT_BELOW: Duration = Duration::from_micros(200);

type Polled = Poll<Option<std::result::Result<hyper::body::Frame<Bytes>, hyper::Error>>>;

/// One poll of the body for its next frame, without waiting.
async fn poll_once(body: &mut Incoming) -> Polled {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
}

/// Reads a response body frame by frame under the first-byte, idle and total timeouts.
pub struct BodyReader {
    body: Option<Incoming>,
    /// Until the first data frame arrived: the first chunk of a stream (the first token) is still
    /// "first byte" for the client, so it waits for what is left of that budget, not `idle`.
    first_byte_deadline: Option<Instant>,
    deadline: Instant,
    idle: Duration,
    authority: String,
    abort: Arc<Abort>,
    /// An error met while joining ready frames to a chunk (`next_ready`): answered by the next read.
    failed: Option<Box<Error>>,
}

impl BodyReader {
    /// The handle that aborts this reader from elsewhere.
    pub fn abort_handle(&self) -> Arc<Abort> {
        self.abort.clone()
    }

    /// Next chunk of the body as the backend sent it, or `None` at the end (or once aborted).
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        if let Some(err) = self.failed.take() {
            return Err(*err);
        }
        loop {
            let Some(body) = self.body.as_mut() else {
                return Ok(None);
            };
            let now = Instant::now();
            if now >= self.deadline {
                self.body = None;
                return Err(self.timeout(Phase::Total));
            }
            let (wait, wait_phase) = match self.first_byte_deadline {
                Some(first) => (first.saturating_duration_since(now), Phase::FirstByte),
                None => (self.idle, Phase::Idle),
            };
            let (limit, phase) = if self.deadline - now < wait {
                (self.deadline - now, Phase::Total)
            } else {
                (wait, wait_phase)
            };
            let abort = self.abort.clone();
            let Some(frame) = abort
                .unless_triggered(tokio::time::timeout(limit, body.frame()))
                .await
            else {
                self.body = None;
                return Ok(None);
            };
            match frame {
                Err(_) => {
                    self.body = None;
                    return Err(self.timeout(phase));
                }
                Ok(None) => {
                    self.body = None;
                    return Ok(None);
                }
                Ok(Some(Err(err))) => {
                    self.body = None;
                    return Err(Error::Protocol {
                        authority: self.authority.clone(),
                        reason: root_cause(&err),
                    });
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            self.first_byte_deadline = None;
                            return Ok(Some(data));
                        }
                    }
                }
            }
        }
    }

    /// The next chunk, with the chunks right behind it that have already arrived joined to it (up
    /// to `max` bytes in all), or `None` at the end. Bytes and their order are the backend's; only
    /// the boundaries between chunks that were there at once go.
    ///
    /// NOTE: a fast backend's events arrive several per read; handed over one by one, each cost a
    /// round trip between the threads and one send to the client. A chunk that is not there yet is
    /// never waited for, so nothing is held back.
    pub async fn next_ready(&mut self, max: usize) -> Result<Option<Bytes>> {
        let asked = Instant::now();
        let Some(first) = self.next_chunk().await? else {
            return Ok(None);
        };
        if asked.elapsed() > JOIN_AFTER_WAIT_BELOW {
            // It had to be waited for (a paced stream): the next one is not there either, and
            // looking costs a wake-up of the connection task per chunk.
            return Ok(Some(first));
        }
        let mut joined: Option<BytesMut> = None;
        while joined.as_ref().map_or(first.len(), BytesMut::len) < max {
            let Some(body) = self.body.as_mut() else {
                break;
            };
            // NOTE: hyper's connection task decodes the next chunk only once this body asks for it
            // (the first poll wakes it), so one yield lets it hand over what it already has.
            let mut polled = poll_once(body).await;
            if polled.is_pending() {
                tokio::task::yield_now().await;
                polled = poll_once(body).await;
            }
            match polled {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    self.body = None; // the end: the next read answers `None` at once
                    break;
                }
                Poll::Ready(Some(Err(err))) => {
                    self.body = None;
                    self.failed = Some(Box::new(Error::Protocol {
                        authority: self.authority.clone(),
                        reason: root_cause(&err),
                    }));
                    break;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        joined
                            .get_or_insert_with(|| BytesMut::from(&first[..]))
                            .extend_from_slice(&data);
                    }
                }
            }
        }
        Ok(Some(joined.map_or(first, BytesMut::freeze)))
    }

    /// The next chunk if it is already there or arrives within `grace`; `Ok(None)` otherwise, with
    /// the reader left as it was (nothing is lost: `frame()` is cancel-safe).
    pub async fn chunk_if_ready(&mut self, grace: Duration) -> Result<Option<Bytes>> {
        match tokio::time::timeout(grace, self.next_chunk()).await {
            Ok(chunk) => chunk,
            Err(_) => Ok(None),
        }
    }

    /// The rest of the body in one buffer (for answers the client receives whole).
    pub async fn read_all(&mut self) -> Result<Bytes> {
        // A whole answer's body follows its headers: it is read under the idle limit, as before.
        self.first_byte_deadline = None;
        let Some(first) = self.next_chunk().await? else {
            return Ok(Bytes::new());
        };
        let Some(second) = self.next_chunk().await? else {
            // NOTE: the common case (one frame) is handed over without a copy.
            return Ok(first);
        };
        let mut buffer = BytesMut::with_capacity(first.len() + second.len());
        buffer.extend_from_slice(&first);
        buffer.extend_from_slice(&second);
        while let Some(chunk) = self.next_chunk().await? {
            buffer.extend_from_slice(&chunk);
        }
        Ok(buffer.freeze())
    }

    /// Drop the body now: the connection is closed, not returned to the pool.
    pub fn abort(&mut self) {
        self.body = None;
    }

    fn timeout(&self, phase: Phase) -> Error {
        Error::Timeout {
            authority: self.authority.clone(),
            phase,
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
