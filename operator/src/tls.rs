//! TLS toward the agents: the CA that signed their certificates, the operator's own client certificate (mutual
//! TLS, which an agent serving TLS requires of every caller), and the name the agents' certificates are checked
//! against. The files are read and checked once, at start: a missing, unreadable or malformed one is an error
//! naming its flag and path.

use std::path::{Path, PathBuf};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::Error;

/// The TLS settings as given (each `None` when its flag is absent); [`AgentTls::load`] checks them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentTlsFiles {
    /// `--agent-tls-ca`: PEM, the CA that signed the agents' certificates.
    pub ca: Option<PathBuf>,
    /// `--agent-tls-cert`: PEM, the operator's client certificate (chain), presented to the agents.
    pub cert: Option<PathBuf>,
    /// `--agent-tls-key`: PEM, its private key.
    pub key: Option<PathBuf>,
    /// `--agent-tls-server-name`: the name every agent's certificate must hold; without it, the address dialled
    /// (the pod IP, which then needs an IP SAN).
    pub server_name: Option<String>,
}

/// TLS toward the agents, loaded and checked.
#[derive(Clone)]
pub struct AgentTls {
    config: ClientTlsConfig,
    files: AgentTlsFiles,
}

impl std::fmt::Debug for AgentTls {
    // The paths only: the client configuration holds the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTls").field("files", &self.files).finish_non_exhaustive()
    }
}

fn bad(message: String) -> Error {
    Error::AgentTls(message)
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|error| bad(format!("cannot read {flag} {}: {error}", path.display())))
}

/// Every PEM certificate in `pem`; at least one.
fn certificates(flag: &str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| bad(format!("{flag} {}: not a PEM certificate file: {error}", path.display())))?;
    if certificates.is_empty() {
        return Err(bad(format!("{flag} {}: no PEM certificate (\"BEGIN CERTIFICATE\") in it", path.display())));
    }
    Ok(certificates)
}

/// The whole error chain, for errors whose top line says little ("transport error").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl AgentTls {
    /// Checks the combination, reads the files and checks them: `Ok(None)` when no TLS flag is given. The CA alone
    /// gives server-authenticated TLS (enough for agents that do not require client certificates); the CA with
    /// the client certificate and key gives mutual TLS.
    pub fn load(files: &AgentTlsFiles) -> Result<Option<Self>, Error> {
        let AgentTlsFiles { ca, cert, key, server_name } = files;
        let ca = match (ca, cert, key, server_name) {
            (None, None, None, None) => return Ok(None),
            (_, Some(_), None, _) | (_, None, Some(_), _) => {
                return Err(bad("--agent-tls-cert and --agent-tls-key go together: give both or neither".into()));
            }
            (None, Some(_), Some(_), _) => {
                return Err(bad(
                    "--agent-tls-cert and --agent-tls-key need --agent-tls-ca (the CA that signed the agents' \
                     certificates): the operator must verify the agents it sends its client certificate to"
                        .into(),
                ));
            }
            (None, None, None, Some(_)) => {
                return Err(bad("--agent-tls-server-name needs --agent-tls-ca".into()));
            }
            (Some(ca), ..) => ca,
        };
        let mut config = ClientTlsConfig::new();
        if let Some(name) = server_name {
            if ServerName::try_from(name.as_str()).is_err() {
                return Err(bad(format!("--agent-tls-server-name {name:?} is neither a DNS name nor an IP address")));
            }
            config = config.domain_name(name.clone());
        }
        let ca_pem = read("--agent-tls-ca", ca)?;
        let mut roots = RootCertStore::empty();
        for (index, certificate) in certificates("--agent-tls-ca", ca, &ca_pem)?.into_iter().enumerate() {
            roots.add(certificate).map_err(|error| {
                bad(format!("--agent-tls-ca {}: certificate {} is not usable: {error}", ca.display(), index + 1))
            })?;
        }
        config = config.ca_certificate(Certificate::from_pem(ca_pem));
        if let (Some(cert), Some(key)) = (cert, key) {
            let cert_pem = read("--agent-tls-cert", cert)?;
            certificates("--agent-tls-cert", cert, &cert_pem)?;
            let key_pem = read("--agent-tls-key", key)?;
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| {
                bad(format!("--agent-tls-key {}: no usable PEM private key: {error}", key.display()))
            })?;
            config = config.identity(Identity::from_pem(cert_pem, key_pem));
        }
        // Build the client configuration once now, so what only rustls checks (the key loads and belongs to the
        // certificate) fails here rather than on the first call.
        if let Err(error) = Endpoint::from_static("https://127.0.0.1").tls_config(config.clone()) {
            let what = match (cert, key) {
                (Some(cert), Some(key)) => format!(
                    "--agent-tls-cert {} and --agent-tls-key {} do not make a client identity",
                    cert.display(),
                    key.display()
                ),
                _ => format!("--agent-tls-ca {} cannot be used", ca.display()),
            };
            return Err(bad(format!("{what}: {}", chain(&error))));
        }
        Ok(Some(Self { config, files: files.clone() }))
    }

    /// The client configuration for each agent's channel.
    pub(crate) fn client(&self) -> ClientTlsConfig {
        self.config.clone()
    }

    /// The operator presents a client certificate (mutual TLS).
    pub fn mutual(&self) -> bool {
        self.files.cert.is_some()
    }

    /// What it was loaded from.
    pub fn files(&self) -> &AgentTlsFiles {
        &self.files
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    use super::*;

    /// A CA, a client certificate it signed and that certificate's key, as PEM; plus an unrelated key.
    struct Pki {
        ca: String,
        cert: String,
        key: String,
        other_key: String,
    }

    fn pki() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert =
            CertificateParams::new(vec!["rootscale-operator".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
        Pki {
            ca: ca.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
            other_key: KeyPair::generate().unwrap().serialize_pem(),
        }
    }

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("rootscale-tls-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn error(files: &AgentTlsFiles) -> String {
        match AgentTls::load(files) {
            Ok(tls) => panic!("accepted {files:?}: {tls:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn no_flags_no_tls_and_good_files_load() {
        assert!(AgentTls::load(&AgentTlsFiles::default()).unwrap().is_none());
        let pki = pki();
        let dir = Dir::new("good");
        let ca = AgentTlsFiles { ca: Some(dir.file("ca.crt", &pki.ca)), ..Default::default() };
        let server_only = AgentTls::load(&ca).unwrap().unwrap();
        assert!(!server_only.mutual());
        let mutual = AgentTlsFiles {
            cert: Some(dir.file("tls.crt", &pki.cert)),
            key: Some(dir.file("tls.key", &pki.key)),
            server_name: Some("rootscale-agent".into()),
            ..ca
        };
        let tls = AgentTls::load(&mutual).unwrap().unwrap();
        assert!(tls.mutual());
        assert_eq!(tls.files(), &mutual);
        // Debug shows the paths, never the key.
        let shown = format!("{tls:?}");
        assert!(shown.contains("tls.key") && !shown.contains("PRIVATE KEY"), "{shown}");
    }

    #[test]
    fn flag_combinations_that_cannot_work_are_refused() {
        let path = |name: &str| Some(PathBuf::from(name));
        let only_cert = AgentTlsFiles { ca: path("ca.crt"), cert: path("tls.crt"), ..Default::default() };
        assert!(error(&only_cert).contains("--agent-tls-cert and --agent-tls-key go together"));
        let only_key = AgentTlsFiles { key: path("tls.key"), ..Default::default() };
        assert!(error(&only_key).contains("go together"));
        let no_ca = AgentTlsFiles { cert: path("tls.crt"), key: path("tls.key"), ..Default::default() };
        assert!(error(&no_ca).contains("need --agent-tls-ca"));
        let name_only = AgentTlsFiles { server_name: Some("rootscale-agent".into()), ..Default::default() };
        assert!(error(&name_only).contains("--agent-tls-server-name needs --agent-tls-ca"));
        let dir = Dir::new("name");
        let bad_name = AgentTlsFiles {
            ca: Some(dir.file("ca.crt", &pki().ca)),
            server_name: Some("no spaces".into()),
            ..Default::default()
        };
        assert!(error(&bad_name).contains("--agent-tls-server-name \"no spaces\" is neither"));
    }

    #[test]
    fn missing_unreadable_and_malformed_files_name_their_flag_and_path() {
        let pki = pki();
        let dir = Dir::new("bad");
        let ca = dir.file("ca.crt", &pki.ca);
        let cert = dir.file("tls.crt", &pki.cert);
        let key = dir.file("tls.key", &pki.key);
        let mutual =
            AgentTlsFiles { ca: Some(ca.clone()), cert: Some(cert.clone()), key: Some(key.clone()), server_name: None };
        let missing = dir.0.join("absent.crt");
        for (files, expected) in [
            (
                AgentTlsFiles { ca: Some(missing.clone()), ..mutual.clone() },
                format!("cannot read --agent-tls-ca {}", missing.display()),
            ),
            (
                AgentTlsFiles { cert: Some(missing.clone()), ..mutual.clone() },
                format!("cannot read --agent-tls-cert {}", missing.display()),
            ),
            (
                AgentTlsFiles { key: Some(missing.clone()), ..mutual.clone() },
                format!("cannot read --agent-tls-key {}", missing.display()),
            ),
            // A directory is not readable as a file.
            (AgentTlsFiles { ca: Some(dir.0.clone()), ..mutual.clone() }, "cannot read --agent-tls-ca".to_string()),
        ] {
            let message = error(&files);
            assert!(message.contains(&expected), "{message}");
        }
        let text = dir.file("text.crt", "not a certificate\n");
        let key_as_ca = dir.file("key-as-ca.crt", &pki.key);
        let garbage = dir.file(
            "garbage.crt",
            "-----BEGIN CERTIFICATE-----\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n-----END CERTIFICATE-----\n",
        );
        let wrong_key = dir.file("other.key", &pki.other_key);
        for (files, expected) in [
            (
                AgentTlsFiles { ca: Some(text.clone()), ..mutual.clone() },
                format!("--agent-tls-ca {}: no PEM certificate", text.display()),
            ),
            (AgentTlsFiles { ca: Some(key_as_ca), ..mutual.clone() }, "--agent-tls-ca".to_string()),
            (
                AgentTlsFiles { ca: Some(garbage.clone()), ..mutual.clone() },
                format!("--agent-tls-ca {}: certificate 1 is not usable", garbage.display()),
            ),
            (
                AgentTlsFiles { cert: Some(text.clone()), ..mutual.clone() },
                format!("--agent-tls-cert {}: no PEM certificate", text.display()),
            ),
            (
                AgentTlsFiles { key: Some(text.clone()), ..mutual.clone() },
                format!("--agent-tls-key {}: no usable PEM private key", text.display()),
            ),
            (AgentTlsFiles { key: Some(cert.clone()), ..mutual.clone() }, "--agent-tls-key".to_string()),
            (
                AgentTlsFiles { key: Some(wrong_key.clone()), ..mutual.clone() },
                format!(
                    "--agent-tls-cert {} and --agent-tls-key {} do not make a client identity",
                    cert.display(),
                    wrong_key.display()
                ),
            ),
            (
                AgentTlsFiles { cert: Some(garbage.clone()), ..mutual.clone() },
                "do not make a client identity".to_string(),
            ),
        ] {
            let message = error(&files);
            assert!(message.contains(&expected), "expected {expected:?} in {message:?}");
        }
    }
}
