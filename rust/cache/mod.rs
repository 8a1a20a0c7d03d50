//! PyO3 face of the response cache: `ResponseCache` wraps [`sharded::ShardedCache`]. Invariant:
//! shard work runs detached from the interpreter and no Python object is created while a shard
//! lock is held (values are cloned out as `Arc`s, then copied into `bytes` after the guard drops).

mod sharded;
#[cfg(test)]
mod sim;

use bytes::Bytes;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

use sharded::{ttl_from_secs, ShardedCache};

fn value_error(err: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(err.to_string())
}

/// Size-capped, TTL-aware S3-FIFO cache of response bodies keyed by a 128-bit request digest.
#[pyclass(module = "ntonix._core", name = "ResponseCache", frozen)]
pub struct ResponseCache {
    inner: ShardedCache,
}

#[pymethods]
impl ResponseCache {
    #[new]
    #[pyo3(signature = (max_bytes, ttl_seconds, shards = 16))]
    fn new(max_bytes: i64, ttl_seconds: f64, shards: i64) -> PyResult<Self> {
        // Taken as signed so a negative size is a ValueError that names it, not an
        // OverflowError from the int conversion.
        let max_bytes = u64::try_from(max_bytes)
            .map_err(|_| value_error(format!("max_bytes must be >= 0, got {max_bytes}")))?;
        let shards = usize::try_from(shards)
            .map_err(|_| value_error(format!("shards must be >= 1, got {shards}")))?;
        let ttl = ttl_from_secs(ttl_seconds).map_err(value_error)?;
        let inner = ShardedCache::new(max_bytes, ttl, shards).map_err(value_error)?;
        Ok(Self { inner })
    }

    /// `(body, content_type)` for a live entry, else None.
    fn get<'py>(
        &self,
        py: Python<'py>,
        key: u128,
    ) -> Option<(Bound<'py, PyBytes>, Bound<'py, PyString>)> {
        let hit = py.detach(|| self.inner.get(key))?;
        Some((
            PyBytes::new(py, &hit.body),
            PyString::new(py, &hit.content_type),
        ))
    }

    /// Stores an answer; False only when the entry alone is larger than the cache.
    #[pyo3(signature = (key, body, content_type, ttl_seconds = None))]
    fn put(
        &self,
        py: Python<'_>,
        key: u128,
        body: &[u8],
        content_type: &str,
        ttl_seconds: Option<f64>,
    ) -> PyResult<bool> {
        let ttl = ttl_seconds
            .map(ttl_from_secs)
            .transpose()
            .map_err(value_error)?;
        // Both borrow Python-owned memory, so they are copied while still attached.
        let body = Bytes::copy_from_slice(body);
        let content_type: Box<str> = content_type.into();
        Ok(py.detach(|| self.inner.put(key, body, content_type, ttl)))
    }

    /// True if a live entry was removed.
    fn remove(&self, py: Python<'_>, key: u128) -> bool {
        py.detach(|| self.inner.remove(key))
    }

    fn clear(&self, py: Python<'_>) {
        py.detach(|| self.inner.clear());
    }

    /// Counters: hits, misses, evictions, expired, entries, size_bytes, max_size_bytes.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        // Plain atomic loads, no lock: cheap enough to stay attached.
        let s = self.inner.stats();
        let dict = PyDict::new(py);
        for (name, value) in [
            ("hits", s.hits),
            ("misses", s.misses),
            ("evictions", s.evictions),
            ("expired", s.expired),
            ("entries", s.entries),
            ("size_bytes", s.size_bytes),
            ("max_size_bytes", s.max_size_bytes),
        ] {
            dict.set_item(name, value)?;
        }
        Ok(dict)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ResponseCache>()
}
