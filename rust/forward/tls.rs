//! TLS settings of the upstream client: rustls (ring provider), the system's trust roots, plus an
//! optional PEM bundle of extra CAs (`Forwarder(ca_file=...)`), for backends behind `https://`.
//!
//! Invariants: the system roots are read once per process (rustls-native-certs, which honours
//! `SSL_CERT_FILE` and `SSL_CERT_DIR`); a CA bundle that cannot be read or holds no valid
//! certificate is refused when the forwarder is built, never at the first request; no ALPN is
//! offered, so the server speaks HTTP/1.1, the protocol the client speaks.
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use crate::errors::{Error, Result};

/// The system's trust anchors, loaded on first use; unreadable entries are skipped (a machine with
/// no CA store still gets a client: its `https://` backends then need `ca_file`).
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// The certificates of a PEM bundle, each checked to be a usable trust anchor.
fn bundle(path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let text = std::fs::read(path)
        .map_err(|e| Error::InvalidArgument(format!("ca_file {path:?} cannot be read: {e}")))?;
    let mut certs = Vec::new();
    for (index, item) in CertificateDer::pem_slice_iter(&text).enumerate() {
        let cert = item.map_err(|e| {
            Error::InvalidArgument(format!(
                "ca_file {path:?}: PEM block {} is not a certificate: {e}",
                index + 1
            ))
        })?;
        let mut probe = RootCertStore::empty();
        probe.add(cert.clone()).map_err(|e| {
            Error::InvalidArgument(format!(
                "ca_file {path:?}: certificate {} is not a valid CA: {e}",
                index + 1
            ))
        })?;
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "ca_file {path:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok(certs)
}

/// The client TLS configuration: system roots, plus those of `ca_file` when given.
pub fn client_config(ca_file: Option<&str>) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(system_roots().iter().cloned());
    if let Some(path) = ca_file {
        for cert in bundle(path)? {
            roots
                .add(cert)
                .map_err(|e| Error::InvalidArgument(format!("ca_file {path:?}: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // NOTE: ALPN stays empty (hyper-rustls refuses a preset one and leaves it empty for HTTP/1).
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Runtime(format!("cannot set up TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
