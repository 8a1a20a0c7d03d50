//! `ntonix._core`: registers the hot-path pieces (forwarder, cache, errors, runtime) and nothing else.
use pyo3::prelude::*;

mod cache;
mod errors;
mod forward;
mod route;
mod runtime;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::init_pymodule(m)?;
    runtime::init_pymodule(m)?;
    forward::init_pymodule(m)?;
    cache::init_pymodule(m)?;
    route::init_pymodule(m)?;
    Ok(())
}
