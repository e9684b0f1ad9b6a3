//! TLS on the listener (`[server.tls]`), with rustls.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio_rustls::TlsAcceptor;

use crate::config::ConfigProblem;

/// The `[server.tls]` table: serve `wss://` and `https://` instead of plain TCP.
#[derive(Debug, Clone, Deserialize)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl TlsConfig {
    pub(crate) fn validate(&self, problems: &mut Vec<ConfigProblem>) {
        if let Err(e) = self.acceptor() {
            problems.push(ConfigProblem::new("server.tls", e));
        }
    }

    /// Loads the certificate and key into an acceptor.
    pub fn acceptor(&self) -> Result<TlsAcceptor, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert_file)
            .and_then(|certs| certs.collect())
            .map_err(|e| format!("cert_file {}: {e}", self.cert_file.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "cert_file {}: no certificate found",
                self.cert_file.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key_file)
            .map_err(|e| format!("key_file {}: {e}", self.key_file.display()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("certificate and key do not form a usable pair: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}
