//! TLS for the load tool (`--tls`, `--vs-tls`): a client that measures what TLS costs the
//! server, and the certificate the spawned servers are given.
//!
//! The client does not authenticate the server: it loads 127.0.0.1 only, and whom it talks
//! to is not in question. It still checks the handshake's signature with the server's key,
//! as a browser would, so the tool's own CPU per handshake is a real client's. Session
//! resumption is off unless asked for (`--tls-resume`): every new connection is then a full
//! handshake, a browser's first visit, the costliest case for the server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// A self-signed certificate for 127.0.0.1 and its key, written into `dir` as PEM (made
/// once per run; every TLS configuration's servers use it).
pub fn self_signed(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .map_err(|e| format!("cannot make a certificate: {e}"))?;
    let cert = dir.join("loadtest-cert.pem");
    let key = dir.join("loadtest-key.pem");
    for (path, text) in [
        (&cert, made.cert.pem()),
        (&key, made.key_pair.serialize_pem()),
    ] {
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok((cert, key))
}

/// The client side: HTTP/1.1 by ALPN, TLS 1.2 or 1.3 as the server prefers.
pub(crate) fn client_config(resume: bool) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyCertificate(provider.signature_verification_algorithms));
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        config.resumption = Resumption::disabled();
    }
    Arc::new(config)
}

/// The name the client sends (SNI is not sent for an IP address).
pub(crate) fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}

/// Accepts any certificate, but checks that the server signed the handshake with its key.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
