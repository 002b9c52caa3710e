//! Test certificates shaped like Istio's: a root CA per trust domain and workload certificates
//! whose identity is the URI SAN `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate authority for one trust domain; its PEM files live in a directory that is
/// deleted when the `TestCa` is dropped (unless made with [`TestCa::new_in`]). Keep the `TestCa`
/// alive as long as an Envoy reads its files.
pub struct TestCa {
    trust_domain: String,
    dir: CertDir,
    ca_path: PathBuf,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    issued: AtomicU64,
}

enum CertDir {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

impl CertDir {
    fn path(&self) -> &Path {
        match self {
            CertDir::Temporary(dir) => dir.path(),
            CertDir::Kept(path) => path,
        }
    }
}

/// A workload's certificate, usable both as TLS server and TLS client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadCert {
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`
    pub spiffe_id: String,
    /// PEM: the workload certificate (signed directly by the root).
    pub cert_path: PathBuf,
    /// PEM: its PKCS#8 private key (ECDSA P-256).
    pub key_path: PathBuf,
    /// PEM: the root CA certificate that validates every workload of the trust domain.
    pub ca_path: PathBuf,
}

impl TestCa {
    /// A new CA for `trust_domain` (e.g. `cluster.local`), with its files in a temporary
    /// directory.
    pub fn new(trust_domain: &str) -> Result<TestCa> {
        let dir = tempfile::Builder::new()
            .prefix("eastwest-certs-")
            .tempdir()
            .context("cannot create a temporary directory for certificates")?;
        Self::create(trust_domain, CertDir::Temporary(dir))
    }

    /// A new CA for `trust_domain` writing its files into `dir` (created if needed, kept).
    pub fn new_in(trust_domain: &str, dir: &Path) -> Result<TestCa> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Self::create(trust_domain, CertDir::Kept(dir.to_path_buf()))
    }

    fn create(trust_domain: &str, dir: CertDir) -> Result<TestCa> {
        let key = KeyPair::generate().context("cannot generate the CA key")?;
        let mut params = CertificateParams::default();
        // Istio's self-signed root carries just the trust domain as organization.
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, trust_domain);
        name.push(
            DnType::CommonName,
            format!("eastwest test root {trust_domain}"),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = params
            .self_signed(&key)
            .context("cannot self-sign the CA certificate")?
            .pem();
        let ca_path = dir.path().join("root-cert.pem");
        write_file(&ca_path, &ca_pem)?;
        Ok(TestCa {
            trust_domain: trust_domain.to_owned(),
            dir,
            ca_path,
            ca_pem,
            issuer: Issuer::new(params, key),
            issued: AtomicU64::new(0),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// PEM file of the root certificate.
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issues the certificate of service account `service_account` in `namespace`: URI SAN
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` plus DNS SAN `localhost`,
    /// key usages digitalSignature and keyEncipherment, extended key usages serverAuth and
    /// clientAuth; empty subject, as Istio's workload certificates have.
    pub fn issue_workload(&self, namespace: &str, service_account: &str) -> Result<WorkloadCert> {
        let spiffe_id = format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        );
        let key = KeyPair::generate().context("cannot generate a workload key")?;
        let mut params = CertificateParams::default();
        // With an empty subject the SAN extension is marked critical (RFC 5280 4.2.1.6).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![
            SanType::URI(
                spiffe_id
                    .clone()
                    .try_into()
                    .with_context(|| format!("{spiffe_id} is not a valid URI SAN"))?,
            ),
            SanType::DnsName("localhost".try_into()?),
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("cannot sign the certificate of {spiffe_id}"))?;

        // A counter keeps re-issued certificates from overwriting files an Envoy may watch.
        let serial = self.issued.fetch_add(1, Ordering::SeqCst);
        let stem = format!(
            "{}-{}-{serial}",
            file_safe(namespace),
            file_safe(service_account)
        );
        let cert_path = self.dir().join(format!("{stem}-cert.pem"));
        let key_path = self.dir().join(format!("{stem}-key.pem"));
        write_file(&cert_path, &cert.pem())?;
        write_file(&key_path, &key.serialize_pem())?;
        Ok(WorkloadCert {
            spiffe_id,
            cert_path,
            key_path,
            ca_path: self.ca_path.clone(),
        })
    }
}

fn file_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}
