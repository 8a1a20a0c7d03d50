//! The per-process tokio runtime that drives every upstream request.
//!
//! Invariant: the runtime is built lazily, in the process that uses it, with the thread count the
//! gateway was configured with; a process forked after the runtime was built refuses to use it
//! (a forked tokio runtime has no threads and would hang every request).
use std::sync::atomic::{AtomicU32, Ordering};

use pyo3::prelude::*;

use crate::errors::{Error, Result};

/// PID of the process that configured the runtime (0: not yet configured).
static OWNER_PID: AtomicU32 = AtomicU32::new(0);

/// Configure the runtime's worker threads. Only the first call in a process has an effect; the
/// answer says whether this call was the one that configured it.
pub fn configure(threads: usize) -> Result<bool> {
    let pid = std::process::id();
    match OWNER_PID.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder
                .worker_threads(threads.max(1))
                .thread_name("ntonix-io")
                .enable_all();
            pyo3_async_runtimes::tokio::init(builder);
            Ok(true)
        }
        Err(owner) if owner == pid => Ok(false),
        Err(owner) => Err(Error::Runtime(format!(
            "the I/O runtime was created in process {owner} and cannot be used after fork in {pid}"
        ))),
    }
}

/// Make sure the runtime belongs to this process before handing work to it.
pub fn ensure() -> Result<()> {
    let default_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    configure(default_threads).map(|_| ())
}

/// Configure the I/O runtime's thread count (call once, before the first request).
#[pyfunction]
#[pyo3(signature = (threads))]
fn init_runtime(threads: usize) -> PyResult<bool> {
    if threads == 0 {
        return Err(Error::InvalidArgument("threads must be at least 1".into()).into());
    }
    Ok(configure(threads)?)
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(init_runtime, m)?)?;
    Ok(())
}
