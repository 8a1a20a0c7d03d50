//! PyO3 glue of the upstream client: `Forwarder` (one per process) and `UpstreamResponse`.
//!
//! Invariants: all network work runs on the tokio runtime with the GIL released; a Python awaitable
//! that is cancelled drops its Rust future, and an `UpstreamResponse` that is closed or collected
//! drops its body, so a client that leaves closes the upstream connection and the backend stops.
mod client;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3_async_runtimes::tokio::future_into_py;

use crate::errors::Error;
use crate::runtime;
pub use client::{Abort, BodyReader, Timeouts, Upstream};

fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    if !value.is_finite() || value <= 0.0 {
        return Err(Error::InvalidArgument(format!("{name} must be a positive number of seconds, got {value}")).into());
    }
    Duration::try_from_secs_f64(value)
        .map_err(|_| Error::InvalidArgument(format!("{name} is out of range: {value}")).into())
}

/// A body chunk handed to Python as `bytes`, or `None` at the end of the body.
struct Chunk(Option<Bytes>);

impl<'py> IntoPyObject<'py> for Chunk {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = std::convert::Infallible;

    fn into_pyobject(self, py: Python<'py>) -> Result<Self::Output, Self::Error> {
        Ok(match self.0 {
            Some(data) => PyBytes::new(py, &data).into_any(),
            None => py.None().into_bound(py),
        })
    }
}

/// Pooled keep-alive client to every backend; one per process, shared by all requests.
#[pyclass(frozen, module = "ntonix._core")]
pub struct Forwarder {
    upstream: Arc<Upstream>,
}

#[pymethods]
impl Forwarder {
    #[new]
    #[pyo3(signature = (*, connect_timeout=2.0, first_byte_timeout=120.0, idle_timeout=60.0, total_timeout=600.0, pool_idle_timeout=90.0))]
    fn new(
        connect_timeout: f64,
        first_byte_timeout: f64,
        idle_timeout: f64,
        total_timeout: f64,
        pool_idle_timeout: f64,
    ) -> PyResult<Self> {
        let timeouts = Timeouts {
            connect: seconds("connect_timeout", connect_timeout)?,
            first_byte: seconds("first_byte_timeout", first_byte_timeout)?,
            idle: seconds("idle_timeout", idle_timeout)?,
            total: seconds("total_timeout", total_timeout)?,
        };
        let pool_idle = seconds("pool_idle_timeout", pool_idle_timeout)?;
        runtime::ensure()?;
        // The pool's timers need the runtime's context when the client is built.
        let _guard = pyo3_async_runtimes::tokio::get_runtime().enter();
        Ok(Self {
            upstream: Arc::new(Upstream::new(timeouts, pool_idle)),
        })
    }

    /// Send a request upstream; the awaitable resolves once the status line and headers arrived
    /// (with `buffer=True`, once the whole body arrived too).
    #[pyo3(signature = (method, url, headers, body, buffer=false))]
    fn request<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        url: &str,
        headers: Vec<(String, String)>,
        body: &[u8],
        buffer: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Upstream::build_request(method, url, &headers, Bytes::copy_from_slice(body))?;
        let upstream = self.upstream.clone();
        future_into_py(py, async move {
            let mut response = upstream.send(request).await?;
            let body = if buffer {
                Some(response.body.read_all().await?)
            } else {
                None
            };
            Ok(UpstreamResponse::new(response, body))
        })
    }

    /// GET `url` and answer its status code (active health checks); the body is read and dropped
    /// so the connection goes back to the pool.
    #[pyo3(signature = (url, timeout))]
    fn probe<'py>(&self, py: Python<'py>, url: &str, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let limit = seconds("timeout", timeout)?;
        let request = Upstream::build_request("GET", url, &[], Bytes::new())?;
        let authority = request.uri().authority().map_or_else(String::new, |a| a.to_string());
        let upstream = self.upstream.clone();
        future_into_py(py, async move {
            let exchange = async {
                let mut response = upstream.send(request).await?;
                response.body.read_all().await?;
                Ok::<u16, Error>(response.status)
            };
            match tokio::time::timeout(limit, exchange).await {
                Ok(result) => Ok(result?),
                Err(_) => Err(Error::Timeout {
                    authority,
                    phase: crate::errors::Phase::Total,
                }
                .into()),
            }
        })
    }
}

/// Status, headers and body of one upstream answer.
#[pyclass(frozen, module = "ntonix._core")]
pub struct UpstreamResponse {
    #[pyo3(get)]
    status: u16,
    headers: Vec<(String, String)>,
    body: Option<Bytes>,
    reader: Arc<tokio::sync::Mutex<BodyReader>>,
    abort: Arc<Abort>,
}

impl UpstreamResponse {
    fn new(response: client::Response, body: Option<Bytes>) -> Self {
        let abort = response.body.abort_handle();
        Self {
            status: response.status,
            headers: response.headers,
            body,
            reader: Arc::new(tokio::sync::Mutex::new(response.body)),
            abort,
        }
    }
}

#[pymethods]
impl UpstreamResponse {
    /// Response headers without the hop-by-hop ones, lower-case names, in arrival order.
    #[getter]
    fn headers(&self) -> Vec<(String, String)> {
        self.headers.clone()
    }

    /// The whole body when the request was sent with `buffer=True`, else `None`.
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.body.as_ref().map(|data| PyBytes::new(py, data))
    }

    /// The `content-type` header, if any.
    #[getter]
    fn content_type(&self) -> Option<String> {
        self.headers
            .iter()
            .find(|(name, _)| name == "content-type")
            .map(|(_, value)| value.clone())
    }

    /// Awaitable of the next body chunk exactly as the backend sent it, or `None` at the end.
    fn next_chunk<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let reader = self.reader.clone();
        future_into_py(py, async move {
            let mut reader = reader.lock().await;
            Ok(Chunk(reader.next_chunk().await?))
        })
    }

    /// Awaitable of the rest of the body in one `bytes`.
    fn read<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let reader = self.reader.clone();
        future_into_py(py, async move {
            let mut reader = reader.lock().await;
            Ok(Chunk(Some(reader.read_all().await?)))
        })
    }

    /// Stop reading: the upstream connection is closed (not pooled), so the backend stops.
    fn close(&self) {
        self.abort.trigger();
        if let Ok(mut reader) = self.reader.try_lock() {
            reader.abort();
        }
    }
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Forwarder>()?;
    m.add_class::<UpstreamResponse>()?;
    Ok(())
}
