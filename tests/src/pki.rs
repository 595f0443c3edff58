//! Fresh PKI for one control plane: a CA, the API server's serving certificate, and an
//! X.509 v3 client certificate in `O=system:masters` (rustls rejects v1 certificates).

use std::path::Path;

use base64::Engine as _;
use kube::config::{
    AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::HarnessError;

/// PEM-encoded certificates and keys.
#[derive(Debug)]
pub struct Pki {
    /// CA certificate.
    pub ca_cert: String,
    /// API server certificate (SAN 127.0.0.1, localhost).
    pub server_cert: String,
    /// API server key.
    pub server_key: String,
    /// Client certificate, CN=edgefleet-admin, O=system:masters.
    pub client_cert: String,
    /// Client key.
    pub client_key: String,
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

impl Pki {
    /// Generates the CA and both leaves (ECDSA P-256).
    pub fn generate() -> Result<Self, HarnessError> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name = dn("edgefleet-test-ca", None);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate()?;
        let mut server =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        server.distinguished_name = dn("edgefleet-test-apiserver", None);
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &issuer)?;

        let client_key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client.distinguished_name = dn("edgefleet-admin", Some("system:masters"));
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &issuer)?;

        Ok(Self {
            ca_cert: ca_cert.pem(),
            server_cert: server_cert.pem(),
            server_key: server_key.serialize_pem(),
            client_cert: client_cert.pem(),
            client_key: client_key.serialize_pem(),
        })
    }

    /// Writes `ca.crt`, `server.crt`, `server.key`, `client.crt`, `client.key` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), HarnessError> {
        std::fs::create_dir_all(dir).map_err(crate::io(format!("creating {}", dir.display())))?;
        for (name, pem) in [
            ("ca.crt", &self.ca_cert),
            ("server.crt", &self.server_cert),
            ("server.key", &self.server_key),
            ("client.crt", &self.client_cert),
            ("client.key", &self.client_key),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, pem).map_err(crate::io(format!("writing {}", path.display())))?;
        }
        Ok(())
    }

    /// A kubeconfig with everything embedded.
    pub fn kubeconfig(&self, server: &str) -> Result<Kubeconfig, HarnessError> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        Ok(Kubeconfig {
            clusters: vec![NamedCluster {
                name: "edgefleet-local".into(),
                cluster: Some(Cluster {
                    server: Some(server.to_owned()),
                    certificate_authority_data: Some(b64(&self.ca_cert)),
                    ..Cluster::default()
                }),
                other: Default::default(),
            }],
            auth_infos: vec![NamedAuthInfo {
                name: "edgefleet-admin".into(),
                auth_info: Some(AuthInfo {
                    client_certificate_data: Some(b64(&self.client_cert)),
                    client_key_data: Some(b64(&self.client_key).into()),
                    ..AuthInfo::default()
                }),
                other: Default::default(),
            }],
            contexts: vec![NamedContext {
                name: "edgefleet-local".into(),
                context: Some(Context {
                    cluster: "edgefleet-local".into(),
                    user: Some("edgefleet-admin".into()),
                    ..Context::default()
                }),
                other: Default::default(),
            }],
            current_context: Some("edgefleet-local".into()),
            api_version: Some("v1".into()),
            kind: Some("Config".into()),
            ..Kubeconfig::default()
        })
    }
}
