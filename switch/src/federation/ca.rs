//! The node's agent CA: issues the client certificates auth agents present.
//!
//! Generated on first start (rcgen, ECDSA P-256) into `agent-ca-key.der` (mode 0600) and
//! `agent-ca-cert.der` in the data directory. It signs nothing but agent certificates:
//! subject `CN=<agent id>, O=<tenant>`, extended key usage client-auth only, a lifetime
//! from `[federation] agent_cert_days`. The request's own subject and extensions are
//! ignored: the node decides who the agent is, from the enrolment token it presented.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::CertificateDer;

use super::Fingerprint;

/// The CA.
pub struct AgentCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

impl std::fmt::Debug for AgentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCa").finish_non_exhaustive()
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM.
    pub pem: String,
    /// SHA-256 of the DER, what the node recognises the agent by.
    pub fingerprint: Fingerprint,
    /// End of validity.
    pub not_after: SystemTime,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Parley agent CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl AgentCa {
    /// Loads the CA from `dir`, generating it on first use.
    pub fn load_or_generate(dir: &Path) -> anyhow::Result<Self> {
        let key_path = dir.join("agent-ca-key.der");
        let cert_path = dir.join("agent-ca-cert.der");
        if key_path.exists() && cert_path.exists() {
            let key_der = std::fs::read(&key_path)?;
            let key = KeyPair::try_from(key_der.as_slice())
                .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
            let cert = CertificateDer::from(std::fs::read(&cert_path)?);
            // The issuer needs only the CA's name, key usages and key: the same as at
            // generation, so certificates chain to the stored CA certificate.
            return Ok(Self {
                issuer: Issuer::new(ca_params(), key),
                cert,
            });
        }
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        params.not_before = SystemTime::now().into();
        params.not_after = (SystemTime::now() + Duration::from_secs(20 * 365 * 86_400)).into();
        let cert = params.self_signed(&key)?;
        crate::im::cert::write_private(&key_path, &key.serialize_der())?;
        std::fs::write(&cert_path, cert.der())?;
        tracing::info!(path = %cert_path.display(), "generated the agent CA");
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert: cert.der().clone(),
        })
    }

    /// The CA certificate (the only root agent certificates are checked against).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Issues a client certificate for `agent_id` of `tenant` to the key of `csr_pem`
    /// (whose signature proves the agent holds the key).
    pub fn issue(
        &self,
        csr_pem: &str,
        tenant: &str,
        agent_id: &str,
        lifetime: Duration,
    ) -> anyhow::Result<Issued> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("bad certificate signing request: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent_id);
        dn.push(DnType::OrganizationName, tenant);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let now = SystemTime::now();
        // Tolerates an agent clock somewhat behind: a tenth of the lifetime, at most 5 min
        // (agents renew when a quarter of the whole validity is left).
        let backdate = (lifetime / 10).min(Duration::from_secs(300));
        params.not_before = (now - backdate).into();
        let not_after = now + lifetime;
        params.not_after = not_after.into();
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(Issued {
            pem: cert.pem(),
            fingerprint: super::fingerprint(cert.der()),
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_chaining_client_certificates_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ca = AgentCa::load_or_generate(dir.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let issued = ca
            .issue(&csr, "acme", "agent-1", Duration::from_secs(3600))
            .unwrap();
        // A second load signs with the same key: both certificates verify against the root.
        let again = AgentCa::load_or_generate(dir.path()).unwrap();
        assert_eq!(again.cert(), ca.cert());
        let issued2 = again
            .issue(&csr, "acme", "agent-1", Duration::from_secs(3600))
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        for pem in [&issued.pem, &issued2.pem] {
            let der = super::super::pem_cert(pem).unwrap();
            verifier
                .verify_client_cert(&der, &[], rustls::pki_types::UnixTime::now())
                .unwrap();
        }
        assert_ne!(issued.fingerprint, issued2.fingerprint);
        // The node decides the subject: the agent's id and its tenant, whatever was asked.
        use x509_parser::prelude::FromDer;
        let der = super::super::pem_cert(&issued.pem).unwrap();
        let (_, x) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
        let subject = x.subject();
        let cn = subject.iter_common_name().next().unwrap().as_str().unwrap();
        let o = subject
            .iter_organization()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!((cn, o), ("agent-1", "acme"));
        assert!(!x.is_ca());
        assert!(
            ca.issue("not a csr", "acme", "a", Duration::from_secs(1))
                .is_err()
        );
    }
}
