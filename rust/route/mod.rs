//! PyO3 face of the prefix index: `PrefixIndex` wraps [`prefix::PrefixIndex`] behind one
//! `parking_lot::Mutex`. Invariant: prompts are hashed before the lock is taken and, from
//! [`DETACH_MIN_BYTES`] up, with the interpreter detached; no Python object is created while the
//! index lock is held, and the index lock and the memo lock are never held together.
//!
//! The policy calls `match_prefix(text)` and then `insert(text, chosen)` with the same `str`
//! object, so the hashes of the last matched prompt are kept (with a strong reference to it,
//! which makes identity mean equal content) and the insert does not hash the prompt again.

pub mod prefix;

use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use prefix::{BlockHasher, BlockHashes, PrefixError, MAX_BACKEND_ID};

/// Prompts shorter than this are handled without detaching: below it the detach/re-attach
/// pair costs a large share of the work it would let other threads overlap (ADR 006).
const DETACH_MIN_BYTES: usize = 4096;

fn to_py_err(err: PrefixError) -> PyErr {
    PyValueError::new_err(err.to_string())
}

fn backend_id(backend: i64) -> PyResult<u32> {
    u32::try_from(backend)
        .ok()
        .filter(|&b| b <= MAX_BACKEND_ID)
        .ok_or_else(|| to_py_err(PrefixError::Backend(i128::from(backend))))
}

/// Runs `f` detached from the interpreter when `text` is long enough to be worth it.
fn maybe_detach<T: Send>(py: Python<'_>, text: &str, f: impl FnOnce() -> T + Send) -> T {
    if text.len() >= DETACH_MIN_BYTES {
        py.detach(f)
    } else {
        f()
    }
}

/// Approximate KV-cache prefix index with a global memory budget (API in `_core.pyi`).
#[pyclass(module = "ntonix._core", name = "PrefixIndex", frozen)]
pub struct PrefixIndex {
    /// Copied out of the index: hashing needs no lock.
    hasher: BlockHasher,
    inner: Mutex<prefix::PrefixIndex>,
    /// The last prompt matched and its hashes, taken by the insert that follows.
    memo: Mutex<Option<(Py<PyString>, Arc<BlockHashes>)>>,
}

impl PrefixIndex {
    fn memo_take(&self, text: &Bound<'_, PyString>) -> Option<Arc<BlockHashes>> {
        let mut memo = self.memo.lock();
        match memo.as_ref() {
            Some((held, _)) if held.is(text) => memo.take().map(|(_, hashes)| hashes),
            _ => None,
        }
    }
}

#[pymethods]
impl PrefixIndex {
    #[new]
    #[pyo3(signature = (max_bytes, block_chars = 64))]
    fn new(max_bytes: i64, block_chars: i64) -> PyResult<Self> {
        let max_bytes = u64::try_from(max_bytes).map_err(|_| {
            PyValueError::new_err(format!("max_bytes must be >= 0, got {max_bytes}"))
        })?;
        let block = usize::try_from(block_chars).map_err(|_| {
            PyValueError::new_err(format!("block_chars must be >= 1, got {block_chars}"))
        })?;
        let inner = prefix::PrefixIndex::new(max_bytes, block).map_err(to_py_err)?;
        Ok(Self {
            hasher: inner.hasher(),
            inner: Mutex::new(inner),
            memo: Mutex::new(None),
        })
    }

    /// `{backend: characters of text it holds}` for every backend holding a prefix of `text`.
    fn match_prefix<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyString>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let s = text.to_str()?;
        let (hashes, found) = maybe_detach(py, s, || {
            let hashes = self.hasher.hash(s);
            let found = self.inner.lock().match_prefix(s, &hashes);
            (hashes, found)
        });
        // The old memo (if any) is dropped here, attached.
        *self.memo.lock() = Some((text.clone().unbind(), Arc::new(hashes)));
        let dict = PyDict::new(py);
        for (backend, chars) in found {
            dict.set_item(backend, chars)?;
        }
        Ok(dict)
    }

    /// Records that `backend` now holds the prompt's blocks (evicting the least recently used
    /// ones when the budget is full).
    fn insert(&self, py: Python<'_>, text: &Bound<'_, PyString>, backend: i64) -> PyResult<()> {
        let backend = backend_id(backend)?;
        let memo = self.memo_take(text);
        let s = text.to_str()?;
        maybe_detach(py, s, || {
            let hashes = memo.unwrap_or_else(|| Arc::new(self.hasher.hash(s)));
            self.inner.lock().insert(&hashes, backend).map(|_| ())
        })
        .map_err(to_py_err)
    }

    /// Feedback: `backend` had only the first `cached_chars` characters of `text` cached, so
    /// it forgets the prompt's blocks past them. Returns the entries dropped.
    fn weaken(
        &self,
        py: Python<'_>,
        text: &str,
        backend: i64,
        cached_chars: i64,
    ) -> PyResult<usize> {
        let backend = backend_id(backend)?;
        let cached = usize::try_from(cached_chars).unwrap_or(0);
        Ok(maybe_detach(py, text, || {
            let hashes = self.hasher.hash(text);
            self.inner.lock().weaken(text, &hashes, backend, cached)
        }))
    }

    /// Forgets a removed or unhealthy backend; returns the entries dropped.
    fn remove_backend(&self, py: Python<'_>, backend: i64) -> PyResult<usize> {
        let backend = backend_id(backend)?;
        Ok(py.detach(|| self.inner.lock().remove_backend(backend)))
    }

    fn clear(&self, py: Python<'_>) {
        self.memo.lock().take();
        py.detach(|| self.inner.lock().clear());
    }

    /// Sizes and counters (names in `_core.pyi`).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.lock().stats();
        let dict = PyDict::new(py);
        for (name, value) in [
            ("entries", s.entries),
            ("blocks", s.blocks),
            ("bytes_used", s.bytes_used),
            ("bytes_reserved", s.bytes_reserved),
            ("max_bytes", s.max_bytes),
            ("capacity", s.capacity),
            ("block_chars", s.block_chars),
            ("backends", s.backends),
            ("lookups", s.lookups),
            ("matched_lookups", s.matched_lookups),
            ("matched_chars", s.matched_chars),
            ("inserts", s.inserts),
            ("evictions", s.evictions),
            ("weakened", s.weakened),
            ("removed", s.removed),
        ] {
            dict.set_item(name, value)?;
        }
        Ok(dict)
    }

    /// (block, backend) entries held.
    fn __len__(&self) -> usize {
        self.inner.lock().len()
    }
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PrefixIndex>()
}
