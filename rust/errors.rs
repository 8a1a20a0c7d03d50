//! The one error type of the crate and its one mapping to Python exceptions.
//!
//! Invariant: every failure that crosses into Python is one of the typed exceptions below, so the
//! Python side decides retries and status codes by class, never by parsing messages.
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;

create_exception!(
    _core,
    NtonixError,
    PyException,
    "Base class of every error raised by ntonix._core."
);
create_exception!(
    _core,
    UpstreamError,
    NtonixError,
    "The upstream (backend) request failed."
);
create_exception!(
    _core,
    UpstreamConnectError,
    UpstreamError,
    "No connection could be made to the backend: nothing was sent, so another backend may be tried."
);
create_exception!(
    _core,
    UpstreamTimeoutError,
    UpstreamError,
    "The backend did not answer in time (first byte, idle between chunks or total); a connect timeout is an UpstreamConnectError, since nothing was sent."
);
create_exception!(
    _core,
    UpstreamProtocolError,
    UpstreamError,
    "The backend broke the exchange: reset, closed early or sent something that is not HTTP."
);

/// Where a timeout struck; shown in the message so logs say which limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    FirstByte,
    Idle,
    Total,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::FirstByte => "first byte",
            Phase::Idle => "idle between chunks",
            Phase::Total => "total",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {authority}: {reason}")]
    Connect { authority: String, reason: String },
    #[error("backend {authority} timed out ({phase} timeout)")]
    Timeout { authority: String, phase: Phase },
    #[error("backend {authority} failed: {reason}")]
    Protocol { authority: String, reason: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Runtime(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let msg = err.to_string();
        match err {
            Error::Connect { .. } => UpstreamConnectError::new_err(msg),
            Error::Timeout { .. } => UpstreamTimeoutError::new_err(msg),
            Error::Protocol { .. } => UpstreamProtocolError::new_err(msg),
            Error::InvalidArgument(_) => PyValueError::new_err(msg),
            Error::Runtime(_) => NtonixError::new_err(msg),
        }
    }
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("NtonixError", py.get_type::<NtonixError>())?;
    m.add("UpstreamError", py.get_type::<UpstreamError>())?;
    m.add(
        "UpstreamConnectError",
        py.get_type::<UpstreamConnectError>(),
    )?;
    m.add(
        "UpstreamTimeoutError",
        py.get_type::<UpstreamTimeoutError>(),
    )?;
    m.add(
        "UpstreamProtocolError",
        py.get_type::<UpstreamProtocolError>(),
    )?;
    Ok(())
}
