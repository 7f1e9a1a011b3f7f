//! TLS for SIP (RFC 3261 §26.2, hop by hop; `sip:…;transport=tls`, not `sips:` end to
//! end, RFC 5630): the listener's certificate and key (PEM files from the configuration,
//! or a self-signed pair generated in demo mode), and the client side toward trunks,
//! which trusts the CA certificates named for that trunk and verifies the trunk's name or
//! IP address. rustls with the ring provider, as for QUIC.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::stream::TlsClient;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{}: cannot read", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate in it",
        path.display()
    );
    Ok(certs)
}

/// The listener's configuration from a PEM certificate chain and a PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{}: not a PEM private key", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("certificate and key do not go together")?;
    Ok(Arc::new(config))
}

/// A self-signed certificate for `localhost` and 127.0.0.1 in `dir` (demo mode), made on
/// first use and kept: `(certificate, key)` paths.
pub fn demo_pair(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = dir.join("sip-tls-cert.pem");
    let key = dir.join("sip-tls-key.pem");
    if !(cert.exists() && key.exists()) {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])?;
        std::fs::write(&cert, ck.cert.pem())?;
        crate::im::cert::write_private(&key, ck.signing_key.serialize_pem().as_bytes())?;
        tracing::info!(path = %cert.display(), "generated self-signed SIP TLS certificate (demo mode)");
    }
    Ok((cert, key))
}

/// How to reach a trunk over TLS: trusting the certificates in `ca` (PEM), verifying
/// `name` (a DNS name or an IP address).
pub fn client(ca: &Path, name: &str) -> anyhow::Result<TlsClient> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca)? {
        roots
            .add(c)
            .with_context(|| format!("{}: unusable CA certificate", ca.display()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(name.to_owned())
        .with_context(|| format!("{name:?} is not a DNS name or IP address"))?;
    Ok(TlsClient {
        config: Arc::new(config),
        name,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_demo_pair_loads_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = super::demo_pair(dir.path()).unwrap();
        assert!(super::server_config(&cert, &key).is_ok());
        assert!(super::client(&cert, "127.0.0.1").is_ok());
        let e = super::server_config(&key, &key).unwrap_err().to_string();
        assert!(e.contains("sip-tls-key.pem"), "{e}");
        let e = super::client(&cert, "not a name!").unwrap_err().to_string();
        assert!(e.contains("not a DNS name"), "{e}");
    }
}
