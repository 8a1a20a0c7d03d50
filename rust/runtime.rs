//! The per-process tokio runtime that drives every upstream request.
//!
//! Invariant: the runtime is built lazily, in the process that uses it, with the thread count the
//! gateway was configured with; a process forked after the runtime was built refuses to use it
//! (a forked tokio runtime has no threads and would hang every request).
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;

use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::errors::{Error, Result};

static THREADS: AtomicUsize = AtomicUsize::new(0);
static OWNER_PID: AtomicU32 = AtomicU32::new(0);
static RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();

/// Set the worker thread count; only effective before the runtime is first used.
pub fn configure(threads: usize) -> bool {
    RUNTIME.get().is_none() && THREADS.swap(threads.max(1), Ordering::SeqCst) == 0
}

/// The runtime of this process, built on first use.
pub fn get() -> Result<&'static Runtime> {
    let pid = std::process::id();
    let owner = OWNER_PID.load(Ordering::SeqCst);
    if owner != 0 && owner != pid {
        return Err(Error::Runtime(format!(
            "the I/O runtime was created in process {owner} and cannot be used after fork in {pid}"
        )));
    }
    let built = RUNTIME.get_or_init(|| {
        OWNER_PID.store(pid, Ordering::SeqCst);
        let threads = match THREADS.load(Ordering::SeqCst) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("ntonix-io")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the I/O runtime: {e}"))
    });
    built.as_ref().map_err(|e| Error::Runtime(e.clone()))
}

/// Configure the I/O runtime's thread count; answers False when it was already running.
#[pyfunction]
#[pyo3(signature = (threads))]
fn init_runtime(threads: usize) -> PyResult<bool> {
    if threads == 0 {
        return Err(Error::InvalidArgument("threads must be at least 1".into()).into());
    }
    Ok(configure(threads))
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(init_runtime, m)?)?;
    Ok(())
}
