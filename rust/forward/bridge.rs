//! Hands results from tokio tasks to the asyncio loop without taking the GIL on tokio threads.
//!
//! Invariant: tokio threads never attach to Python. A finished task pushes its result on a queue
//! and, only when the queue was idle, writes one byte to a socket pair the asyncio loop watches
//! (`loop.add_reader`); the loop thread, which already holds the GIL, drains the queue and resolves
//! the asyncio futures. Taking the GIL from a tokio thread instead waits for the interpreter's
//! switch interval while the loop is busy, which costs milliseconds per request under load.
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use pyo3::prelude::*;

use crate::errors::Error;

/// What a finished task hands back; turned into Python objects on the loop thread.
pub type Convert = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

struct Completion {
    future: Py<PyAny>,
    /// The future's cancel hook, removed before the result is set (a hook left on the future would
    /// cost one more loop callback per operation, i.e. per stream chunk).
    hook: Option<Py<PyAny>>,
    result: Result<Convert, Error>,
}

/// The queue and wake-up channel shared by a loop and the tasks working for it.
pub struct Bridge {
    queue: Mutex<Vec<Completion>>,
    armed: AtomicBool,
    writer: UnixStream,
    reader: UnixStream,
}

impl Bridge {
    pub fn new() -> std::io::Result<Self> {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        Ok(Self {
            queue: Mutex::new(Vec::with_capacity(64)),
            armed: AtomicBool::new(false),
            writer,
            reader,
        })
    }

    /// The descriptor the asyncio loop watches for readiness.
    pub fn fd(&self) -> i32 {
        self.reader.as_raw_fd()
    }

    /// Called from any thread when a task finishes.
    pub fn complete(
        &self,
        future: Py<PyAny>,
        hook: Option<Py<PyAny>>,
        result: Result<Convert, Error>,
    ) {
        self.queue.lock().push(Completion {
            future,
            hook,
            result,
        });
        if !self.armed.swap(true, Ordering::AcqRel) {
            // A full socket buffer already guarantees a wake-up, so a failed write loses nothing.
            let _ = (&self.writer).write(&[1]);
        }
    }

    /// Resolve every finished future; runs on the loop thread with the GIL held.
    pub fn drain(&self, py: Python<'_>) {
        // Order matters: clear the socket, then disarm, then take the queue. A task finishing after
        // the disarm writes a fresh byte, so no completion is ever left without a wake-up.
        let mut sink = [0u8; 256];
        while matches!((&self.reader).read(&mut sink), Ok(n) if n > 0) {}
        self.armed.store(false, Ordering::Release);
        let batch = std::mem::take(&mut *self.queue.lock());
        for completion in batch {
            let future = completion.future.bind(py);
            // A cancelled future (the client left) takes no result; dropping it releases the work.
            if future
                .call_method0(pyo3::intern!(py, "cancelled"))
                .and_then(|v| v.is_truthy())
                .unwrap_or(true)
            {
                continue;
            }
            if let Some(hook) = completion.hook {
                if let Err(err) =
                    future.call_method1(pyo3::intern!(py, "remove_done_callback"), (hook,))
                {
                    err.write_unraisable(py, Some(future));
                }
            }
            let outcome = match completion.result {
                Ok(convert) => convert(py).and_then(|value| {
                    future
                        .call_method1(pyo3::intern!(py, "set_result"), (value,))
                        .map(|_| ())
                }),
                Err(err) => {
                    let exc: PyErr = err.into();
                    future
                        .call_method1(pyo3::intern!(py, "set_exception"), (exc.value(py),))
                        .map(|_| ())
                }
            };
            if let Err(err) = outcome {
                err.write_unraisable(py, Some(future));
            }
        }
    }
}
