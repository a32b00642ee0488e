//! TLS on the listening port (contract §1.4), so browsers reach askstream over HTTP/2:
//! they speak h2 only over TLS, chosen by ALPN, and over HTTP/1.1 a tab gets six
//! connections per origin, one per open answer.
//!
//! rustls with the ring provider, TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`. The
//! certificate chain and key are PEM files read at startup and again on each reload; the
//! acceptor sits behind a lock so that a reload swaps it for new connections while live
//! ones keep the one they were accepted with.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// The acceptor new connections use.
pub(crate) struct Tls {
    acceptor: RwLock<TlsAcceptor>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads `files` into an acceptor; the error says which file and why.
    pub(crate) fn load(files: &TlsFiles) -> Result<Tls, String> {
        Ok(Tls {
            acceptor: RwLock::new(TlsAcceptor::from(server_config(files)?)),
        })
    }

    /// Reads `files` again and, if they are usable, makes them the acceptor for
    /// connections accepted from now on. If not, the old acceptor stays.
    pub(crate) fn reload(&self, files: &TlsFiles) -> Result<(), String> {
        let fresh = TlsAcceptor::from(server_config(files)?);
        *self.acceptor.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// The acceptor for a connection accepted now.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        // A poisoned lock still holds a whole acceptor: a swap is one assignment.
        self.acceptor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The protocols offered by ALPN, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("{}: no private key read: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "{} and {}: not a usable certificate and key: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// Whether the client chose HTTP/2 by ALPN.
pub(crate) fn chose_h2<IO>(stream: &tokio_rustls::server::TlsStream<IO>) -> bool {
    stream.get_ref().1.alpn_protocol() == Some(b"h2")
}
