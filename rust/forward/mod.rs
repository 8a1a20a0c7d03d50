//! PyO3 glue of the upstream client: `Forwarder` (one per event loop), `Pending`, `UpstreamResponse`.
//!
//! Invariants: all network work runs on the tokio runtime and never touches Python; results reach
//! the asyncio loop through the `Bridge` (see bridge.rs). Cancelling a `Pending` aborts its task,
//! and closing or collecting an `UpstreamResponse` drops its body, so a client that leaves closes
//! the upstream connection and the backend stops generating.
mod bridge;
mod client;
mod tls;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyList};
use pyo3::{PyTraverseError, PyVisit};
use tokio::task::AbortHandle;

use crate::errors::{Error, Phase};
use crate::runtime;
use bridge::{Bridge, Convert};
pub use client::{Abort, BodyReader, Timeouts, Upstream};

fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    if !value.is_finite() || value <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "{name} must be a positive number of seconds, got {value}"
        ))
        .into());
    }
    Duration::try_from_secs_f64(value)
        .map_err(|_| Error::InvalidArgument(format!("{name} is out of range: {value}")).into())
}

/// How long `request(buffer=False)` waits for the first body chunk after the headers arrived, so
/// that a chunk sent with (or right behind) the headers reaches Python with them.
const FIRST_CHUNK_GRACE: Duration = Duration::from_millis(2);

/// At most this many bytes of chunks that arrived together are handed to Python as one.
const READY_MAX: usize = 64 * 1024;

/// Done-callback of an asyncio future: when the future is cancelled (`Task.cancel()` on a task
/// awaiting it, `Pending.cancel()`, `asyncio.wait_for` running out), it stops the upstream work.
#[pyclass(frozen, module = "ntonix._core")]
struct CancelHook {
    on_cancel: Box<dyn Fn() + Send + Sync>,
}

#[pymethods]
impl CancelHook {
    fn __call__(&self, future: &Bound<'_, PyAny>) -> PyResult<()> {
        if future
            .call_method0(pyo3::intern!(future.py(), "cancelled"))?
            .is_truthy()?
        {
            (self.on_cancel)();
        }
        Ok(())
    }
}

/// What cancelling an operation's future does.
enum OnCancel {
    /// Abort the tokio task: its future is dropped, and with it the request and its connection.
    AbortTask,
    /// Trigger the body reader's abort: the read in progress drops the body, which closes the
    /// connection (aborting the task alone would leave the body alive in the reader).
    Trigger(Arc<Abort>),
}

/// The event loop a forwarder serves and the bridge that wakes it.
struct LoopLink {
    event_loop: Py<PyAny>,
    bridge: Bridge,
}

impl LoopLink {
    /// Run `work` on the runtime; its result resolves a new asyncio future of this loop. Cancelling
    /// that future stops the work as `on_cancel` says.
    fn spawn<T, W, C>(
        self: &Arc<Self>,
        py: Python<'_>,
        work: W,
        convert: C,
        on_cancel: OnCancel,
    ) -> PyResult<(Py<PyAny>, AbortHandle)>
    where
        T: Send + 'static,
        W: Future<Output = Result<T, Error>> + Send + 'static,
        C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
    {
        let runtime = runtime::get()?;
        let future = self
            .event_loop
            .bind(py)
            .call_method0(pyo3::intern!(py, "create_future"))?;
        // The task's abort handle exists only once it is spawned, and the hook must be on the
        // future before the task can finish: the slot is filled right after the spawn (the task's
        // result is only read on this thread, by `drain`, so it cannot be seen before that).
        let slot: Arc<OnceLock<AbortHandle>> = Arc::new(OnceLock::new());
        let on_cancel: Box<dyn Fn() + Send + Sync> = match on_cancel {
            OnCancel::AbortTask => {
                let slot = slot.clone();
                Box::new(move || {
                    if let Some(task) = slot.get() {
                        task.abort();
                    }
                })
            }
            OnCancel::Trigger(abort) => Box::new(move || abort.trigger()),
        };
        let hook = Py::new(py, CancelHook { on_cancel })?.into_any();
        future.call_method1(
            pyo3::intern!(py, "add_done_callback"),
            (hook.clone_ref(py),),
        )?;
        let future = future.unbind();
        let target = future.clone_ref(py);
        let link = self.clone();
        let task = runtime.spawn(async move {
            let result = work
                .await
                .map(|value| Box::new(move |py: Python<'_>| convert(py, value)) as Convert);
            link.bridge.complete(target, Some(hook), result);
        });
        let abort = task.abort_handle();
        let _ = slot.set(abort.clone());
        Ok((future, abort))
    }
}

fn chunk_to_py(py: Python<'_>, chunk: Option<Bytes>) -> PyResult<Py<PyAny>> {
    Ok(match chunk {
        Some(data) => PyBytes::new(py, &data).into_any().unbind(),
        None => py.None(),
    })
}

/// Pooled keep-alive client to every backend, bound to one asyncio loop; shared by all requests.
#[pyclass(frozen, module = "ntonix._core")]
pub struct Forwarder {
    upstream: Arc<Upstream>,
    link: Arc<LoopLink>,
}

#[pymethods]
impl Forwarder {
    #[new]
    /// `ca_file`: a PEM bundle of CAs trusted for `https://` backends besides the system's roots.
    #[pyo3(signature = (event_loop, *, connect_timeout=2.0, first_byte_timeout=120.0, idle_timeout=60.0, total_timeout=600.0, pool_idle_timeout=90.0, ca_file=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        event_loop: Py<PyAny>,
        connect_timeout: f64,
        first_byte_timeout: f64,
        idle_timeout: f64,
        total_timeout: f64,
        pool_idle_timeout: f64,
        ca_file: Option<String>,
    ) -> PyResult<Self> {
        let timeouts = Timeouts {
            connect: seconds("connect_timeout", connect_timeout)?,
            first_byte: seconds("first_byte_timeout", first_byte_timeout)?,
            idle: seconds("idle_timeout", idle_timeout)?,
            total: seconds("total_timeout", total_timeout)?,
        };
        let pool_idle = seconds("pool_idle_timeout", pool_idle_timeout)?;
        // Reading the system's CA store the first time takes milliseconds: not under the GIL.
        let tls = py.detach(|| tls::client_config(ca_file.as_deref()))?;
        let runtime = runtime::get()?;
        // The pool's timers need the runtime's context when the client is built.
        let _guard = runtime.enter();
        let bridge = Bridge::new()
            .map_err(|e| Error::Runtime(format!("cannot create the wake-up channel: {e}")))?;
        Ok(Self {
            upstream: Arc::new(Upstream::new(timeouts, pool_idle, tls)),
            link: Arc::new(LoopLink { event_loop, bridge }),
        })
    }

    /// Descriptor to watch with `loop.add_reader(fd, forwarder.drain)`.
    #[getter]
    fn wake_fd(&self) -> i32 {
        self.link.bridge.fd()
    }

    /// Resolve the futures of every finished upstream operation (the loop's reader callback).
    fn drain(&self, py: Python<'_>) {
        self.link.bridge.drain(py);
    }

    /// Send a request upstream. Await the answer for the `UpstreamResponse`, resolved as soon as the
    /// status line and headers arrived (with `buffer=True`, once the whole body arrived too).
    #[pyo3(signature = (method, url, headers, body, buffer=false))]
    fn request(
        &self,
        py: Python<'_>,
        method: &str,
        url: &str,
        headers: Vec<(String, String)>,
        body: &[u8],
        buffer: bool,
    ) -> PyResult<Pending> {
        let request = Upstream::build_request(method, url, &headers, Bytes::copy_from_slice(body))?;
        let upstream = self.upstream.clone();
        let link = self.link.clone();
        let work = async move {
            let mut response = upstream.send(request).await?;
            // NOTE: the headers are answered as soon as they arrive (a backend in a long prefill
            // must not hold the client's status line back); a first chunk that came with them, or
            // arrives within the grace, rides along: one loop round trip less to the first token.
            let body = if buffer {
                Some(response.body.read_all().await?)
            } else {
                // NOTE: a chunk is a slice of hyper's 8 KiB read buffer. Kept for the stream's whole
                // life (`UpstreamResponse.body`), the first one pinned that buffer while hyper read
                // every later chunk into a new one: 8 KiB more per open stream. Its few bytes are
                // copied instead (later chunks are copied into Python objects and dropped at once).
                response
                    .body
                    .chunk_if_ready(FIRST_CHUNK_GRACE)
                    .await?
                    .map(|chunk| Bytes::copy_from_slice(&chunk))
            };
            Ok((response, body))
        };
        let (future, abort) = self.link.spawn(
            py,
            work,
            move |py, (response, body)| {
                Ok(Py::new(py, UpstreamResponse::new(response, body, link))?.into_any())
            },
            OnCancel::AbortTask,
        )?;
        Ok(Pending { future, abort })
    }

    /// GET `url` and answer its status code (active health checks); the body is read and dropped
    /// so the connection goes back to the pool.
    #[pyo3(signature = (url, timeout))]
    fn probe(&self, py: Python<'_>, url: &str, timeout: f64) -> PyResult<Pending> {
        let limit = seconds("timeout", timeout)?;
        let request = Upstream::build_request("GET", url, &[], Bytes::new())?;
        let authority = client::endpoint(request.uri());
        let upstream = self.upstream.clone();
        let work = async move {
            let exchange = async {
                let mut response = upstream.send(request).await?;
                response.body.read_all().await?;
                Ok::<u16, Error>(response.status)
            };
            match tokio::time::timeout(limit, exchange).await {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout {
                    authority,
                    phase: Phase::Total,
                }),
            }
        };
        let (future, abort) = self.link.spawn(
            py,
            work,
            |py, status| Ok(status.into_pyobject(py)?.into_any().unbind()),
            OnCancel::AbortTask,
        )?;
        Ok(Pending { future, abort })
    }
}

/// An upstream operation in progress: await it, or cancel it (which drops the upstream work).
#[pyclass(frozen, module = "ntonix._core")]
pub struct Pending {
    future: Py<PyAny>,
    abort: AbortHandle,
}

#[pymethods]
impl Pending {
    /// Lets the cyclic GC see the future. A failed request makes a cycle through it (the pending
    /// handle in a frame -> future -> its exception -> traceback -> that frame); invisible to the
    /// GC, every failed request leaked its frame, exception, protocol and headers (~11 KB).
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.future)
    }

    fn __await__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.future
            .bind(py)
            .call_method0(pyo3::intern!(py, "__await__"))
    }

    /// Abort the upstream work (its connection is closed) and cancel the awaitable.
    fn cancel(&self, py: Python<'_>) -> PyResult<bool> {
        self.abort.abort();
        self.future
            .bind(py)
            .call_method0(pyo3::intern!(py, "cancel"))?
            .is_truthy()
    }

    /// Whether the operation finished (with a result, an error or a cancellation).
    fn done(&self, py: Python<'_>) -> PyResult<bool> {
        self.future
            .bind(py)
            .call_method0(pyo3::intern!(py, "done"))?
            .is_truthy()
    }
}

/// How a body's feed ended (see `Feed`).
enum End {
    Open,
    Done,
    Failed(Error),
}

/// What the pump has read and Python has not taken yet, and the future waiting for it.
struct FeedState {
    chunks: Vec<Bytes>,
    queued: usize,
    end: End,
    /// The asyncio future of a `next_chunk` that found nothing to take, with its cancel hook.
    waiter: Option<(Py<PyAny>, Py<PyAny>)>,
}

/// One streamed body, read by a single tokio task (the pump) for its whole life.
///
/// NOTE: a task spawned per `next_chunk` cost a wake-up of a tokio thread, a task and a lock per
/// chunk, on the core the loop shares. The pump instead stays parked on the body and hands each
/// chunk to the waiting future (or queues it, at most `READY_MAX` bytes ahead of the client, when
/// the loop has not asked yet: the next `next_chunk` then answers at once, without any thread hop).
struct Feed {
    state: parking_lot::Mutex<FeedState>,
    /// Signalled when Python took a queue that had reached `READY_MAX` (the pump waits for room).
    room: tokio::sync::Notify,
}

impl Feed {
    fn new() -> Self {
        Self {
            state: parking_lot::Mutex::new(FeedState {
                chunks: Vec::new(),
                queued: 0,
                end: End::Open,
                waiter: None,
            }),
            room: tokio::sync::Notify::new(),
        }
    }

    /// A chunk read (`Some`) or the end of the body (`None`), from the pump.
    fn deliver(&self, bridge: &Bridge, item: Result<Option<Bytes>, Error>) {
        let mut state = self.state.lock();
        if let Some((future, hook)) = state.waiter.take() {
            if matches!(item, Ok(None) | Err(_)) {
                state.end = End::Done;
            }
            drop(state);
            let result =
                item.map(|chunk| Box::new(move |py: Python<'_>| chunk_to_py(py, chunk)) as Convert);
            bridge.complete(future, Some(hook), result);
            return;
        }
        match item {
            Ok(Some(data)) => {
                state.queued += data.len();
                state.chunks.push(data);
            }
            Ok(None) => state.end = End::Done,
            Err(err) => state.end = End::Failed(err),
        }
    }

    /// The queued chunks joined, if any (the pump is told there is room again).
    fn take(&self, state: &mut FeedState) -> Option<Bytes> {
        let full = state.queued >= READY_MAX;
        let data = match state.chunks.len() {
            0 => return None,
            1 => state.chunks.pop(),
            _ => {
                let mut joined = BytesMut::with_capacity(state.queued);
                for chunk in state.chunks.drain(..) {
                    joined.extend_from_slice(&chunk);
                }
                Some(joined.freeze())
            }
        };
        state.queued = 0;
        if full {
            self.room.notify_one();
        }
        data
    }
}

/// Reads `reader` into `feed` until the end, an error or an abort (the client left, `close`, or the
/// response was dropped); dropping the reader then closes the connection unless it was read whole.
async fn pump(mut reader: BodyReader, feed: Arc<Feed>, link: Arc<LoopLink>, abort: Arc<Abort>) {
    loop {
        // `notify_one` leaves a permit when nobody waits yet, so a take between the check and the
        // wait is not missed.
        while feed.state.lock().queued >= READY_MAX {
            if abort.unless_triggered(feed.room.notified()).await.is_none() {
                return;
            }
        }
        let item = reader.next_ready(READY_MAX).await;
        let last = !matches!(item, Ok(Some(_)));
        feed.deliver(&link.bridge, item);
        if last {
            return;
        }
    }
}

fn ready_future(
    py: Python<'_>,
    link: &LoopLink,
    value: Result<Option<Bytes>, Error>,
) -> PyResult<Py<PyAny>> {
    let future = link
        .event_loop
        .bind(py)
        .call_method0(pyo3::intern!(py, "create_future"))?;
    match value {
        Ok(chunk) => {
            future.call_method1(pyo3::intern!(py, "set_result"), (chunk_to_py(py, chunk)?,))?
        }
        Err(err) => {
            let exc: PyErr = err.into();
            future.call_method1(pyo3::intern!(py, "set_exception"), (exc.value(py),))?
        }
    };
    Ok(future.unbind())
}

/// Status, headers and body of one upstream answer.
#[pyclass(frozen, module = "ntonix._core")]
pub struct UpstreamResponse {
    #[pyo3(get)]
    status: u16,
    headers: Vec<(String, String)>,
    /// The Python list of `headers`, built on first access and handed out as is after that.
    headers_py: PyOnceLock<Py<PyList>>,
    body: Option<Bytes>,
    /// The Python `bytes` of `body`, built on first access (a whole answer is read more than once:
    /// for its usage, for the client, for the cache).
    body_py: PyOnceLock<Option<Py<PyBytes>>>,
    /// The body until it is read: by `read`, or handed to the pump by the first `next_chunk`.
    reader: parking_lot::Mutex<Option<BodyReader>>,
    feed: Arc<Feed>,
    /// The cancel hook put on every future of `next_chunk` (one per response, not per chunk).
    hook: PyOnceLock<Py<PyAny>>,
    abort: Arc<Abort>,
    link: Arc<LoopLink>,
}

impl UpstreamResponse {
    fn new(response: client::Response, body: Option<Bytes>, link: Arc<LoopLink>) -> Self {
        let abort = response.body.abort_handle();
        Self {
            status: response.status,
            headers: response.headers,
            headers_py: PyOnceLock::new(),
            body,
            body_py: PyOnceLock::new(),
            reader: parking_lot::Mutex::new(Some(response.body)),
            feed: Arc::new(Feed::new()),
            hook: PyOnceLock::new(),
            abort,
            link,
        }
    }
}

impl Drop for UpstreamResponse {
    /// A response dropped while its pump runs stops the pump (which closes the connection).
    fn drop(&mut self) {
        self.abort.trigger();
    }
}

#[pymethods]
impl UpstreamResponse {
    /// Lets the cyclic GC see the future waiting for the next chunk (the awaiting task's frame holds
    /// this response, which holds that future).
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(state) = self.feed.state.try_lock() {
            if let Some((future, hook)) = state.waiter.as_ref() {
                visit.call(future)?;
                visit.call(hook)?;
            }
        }
        Ok(())
    }

    /// Response headers without the hop-by-hop ones, lower-case names, in arrival order. Built once:
    /// every access answers the same list (copy it before changing it).
    #[getter]
    fn headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = self
            .headers_py
            .get_or_try_init(py, || PyList::new(py, &self.headers).map(Bound::unbind))?;
        Ok(list.bind(py).clone())
    }

    /// The whole body when the request was sent with `buffer=True`. Else the first chunk of the body
    /// if it came with the headers (or within a few milliseconds of them), or `None` when it had not
    /// arrived yet (or the body is empty): the chunks, the first one included, then come from
    /// `next_chunk`, which answers `None` only at the end of the body. Built once.
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        let body = self.body_py.get_or_init(py, || {
            self.body
                .as_ref()
                .map(|data| PyBytes::new(py, data).unbind())
        });
        body.as_ref().map(|data| data.bind(py).clone())
    }

    /// The `content-type` header, if any.
    #[getter]
    fn content_type(&self) -> Option<String> {
        self.headers
            .iter()
            .find(|(name, _)| name == "content-type")
            .map(|(_, value)| value.clone())
    }

    /// Awaitable of the next body chunk as the backend sent it, with the chunks behind it that have
    /// already arrived joined to it (about `READY_MAX` bytes at most), or `None` at the end.
    /// Cancelling it closes the upstream connection (the rest of the body is given up).
    fn next_chunk(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let mut state = self.feed.state.lock();
        let mut slot = self.reader.lock();
        if slot.is_some() {
            // The runtime first: a failure here leaves the body where it was (nothing is lost).
            let runtime = runtime::get()?;
            if let Some(reader) = slot.take() {
                runtime.spawn(pump(
                    reader,
                    self.feed.clone(),
                    self.link.clone(),
                    self.abort.clone(),
                ));
            }
        }
        drop(slot);
        if let Some(data) = self.feed.take(&mut state) {
            drop(state);
            return ready_future(py, &self.link, Ok(Some(data)));
        }
        match std::mem::replace(&mut state.end, End::Done) {
            End::Done => {
                drop(state);
                return ready_future(py, &self.link, Ok(None));
            }
            End::Failed(err) => {
                drop(state);
                return ready_future(py, &self.link, Err(err));
            }
            End::Open => state.end = End::Open,
        }
        if let Some((future, _)) = state.waiter.as_ref() {
            if !future
                .bind(py)
                .call_method0(pyo3::intern!(py, "done"))?
                .is_truthy()?
            {
                return Err(Error::Runtime(
                    "next_chunk() is already awaited for this response".into(),
                )
                .into());
            }
        }
        let abort = self.abort.clone();
        let hook = self.hook.get_or_try_init(py, || {
            let on_cancel: Box<dyn Fn() + Send + Sync> = Box::new(move || abort.trigger());
            Py::new(py, CancelHook { on_cancel }).map(Py::into_any)
        })?;
        let future = self
            .link
            .event_loop
            .bind(py)
            .call_method0(pyo3::intern!(py, "create_future"))?;
        future.call_method1(
            pyo3::intern!(py, "add_done_callback"),
            (hook.clone_ref(py),),
        )?;
        let future = future.unbind();
        state.waiter = Some((future.clone_ref(py), hook.clone_ref(py)));
        Ok(future)
    }

    /// Awaitable of the rest of the body in one `bytes`; cancelling it closes the connection.
    fn read(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let Some(mut reader) = self.reader.lock().take() else {
            return Err(Error::Runtime(
                "the body is already being read (next_chunk or read)".into(),
            )
            .into());
        };
        self.feed.state.lock().end = End::Done; // a later `next_chunk` answers the end
        let work = async move { reader.read_all().await.map(Some) };
        let on_cancel = OnCancel::Trigger(self.abort.clone());
        Ok(self.link.spawn(py, work, chunk_to_py, on_cancel)?.0)
    }

    /// Stop reading: the upstream connection is closed (not pooled), so the backend stops.
    fn close(&self) {
        self.abort.trigger();
        let reader = self.reader.lock().take();
        if let Some(mut reader) = reader {
            reader.abort();
            self.feed.state.lock().end = End::Done;
        }
    }
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Forwarder>()?;
    m.add_class::<Pending>()?;
    m.add_class::<UpstreamResponse>()?;
    Ok(())
}
