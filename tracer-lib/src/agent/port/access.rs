//! Who may use the agent's port, and as whom (docs/DESIGN.md §1.6, SECURITY.md).
//!
//! | configured | a neighbour's report | an `Advisor` question | whose settings are kept |
//! |---|---|---|---|
//! | nothing | anyone | anyone | anyone's (open: the agent says so at start) |
//! | token | with the token | with the token | the token holder's |
//! | mesh key | with a valid report MAC | with the operator's proof only | the proof's maker |
//! | TLS (with or without a key) | a certificate from the CA (and the MAC) | a certificate from the CA | the certificate naming the operator |
//!
//! Settings combine: each one configured must be satisfied (the token on top of the rest). With TLS, a member's
//! certificate gets answers but changes nothing, whatever proof it sends.

use std::sync::Arc;

use tonic::{
    Request, Status,
    transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig, server::TlsConnectInfo},
};

use crate::{
    Error,
    agent::{port::connections::ConnectionInfo, settings::TlsFiles, state::Asker},
    identity::{
        KeyRing,
        peer::{OperatorProofError, certificate_names, same_secret, verify_operator, verify_report},
    },
};

/// TLS material, loaded once.
#[derive(Clone)]
pub(crate) struct Tls {
    identity: Identity,
    ca: Certificate,
    server_name: Option<String>,
}

impl Tls {
    pub fn load(files: &TlsFiles) -> Result<Self, Error> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|error| Error::Tls(format!("cannot read {}: {error}", path.display())))
        };
        Ok(Self {
            identity: Identity::from_pem(read(&files.cert)?, read(&files.key)?),
            ca: Certificate::from_pem(read(&files.ca)?),
            server_name: files.server_name.clone(),
        })
    }

    /// Mutual TLS toward other agents: verify them against the CA (by `server_name` when given, else by the
    /// address dialled) and present this agent's certificate.
    pub fn client(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(self.ca.clone()).identity(self.identity.clone());
        match &self.server_name {
            Some(name) => config.domain_name(name.clone()),
            None => config,
        }
    }

    /// Serve with this agent's certificate and require one signed by the CA from every caller.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone()).client_ca_root(self.ca.clone())
    }
}

/// What the port requires of its callers.
#[derive(Clone)]
pub(crate) struct Access {
    pub token: Option<String>,
    pub tls: Option<Tls>,
    pub keys: Option<Arc<KeyRing>>,
    /// The DNS name in the operator's client certificate.
    pub operator_identity: String,
}

impl Access {
    /// Checks `authorization: Bearer <token>`, when a token is configured.
    pub fn check_token<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.token else { return Ok(()) };
        let given = request.metadata().get("authorization").map(|value| value.as_bytes()).unwrap_or_default();
        let given = given.strip_prefix(b"Bearer ").unwrap_or_default();
        if same_secret(given, expected.as_bytes()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("missing or wrong agent token"))
        }
    }

    /// A neighbour's report: with a mesh key it must carry a valid MAC over its bytes (TLS has authenticated the
    /// peer already, when configured).
    pub fn check_report(&self, request: &Request<rootscale_proto::v1::NeighborReport>) -> Result<(), Status> {
        self.check_token(request)?;
        let Some(keys) = &self.keys else { return Ok(()) };
        let encoded = prost::Message::encode_to_vec(request.get_ref());
        if verify_report(&keys.current(), request.metadata(), &encoded) {
            Ok(())
        } else {
            Err(Status::unauthenticated("the report carries no valid proof of membership"))
        }
    }

    /// Who asks an `Advisor` question (`method` is the RPC's name), or why the question is refused.
    pub fn asker<T: prost::Message>(&self, request: &Request<T>, method: &str) -> Result<Asker, Status> {
        self.check_token(request)?;
        if self.tls.is_some() {
            // The handshake has checked the certificate against the CA: a member at least. Only the operator's
            // certificate makes it the operator — every member holds the mesh key, so a proof made with it is not
            // enough here.
            return Ok(if self.certificate_names_operator(request) { Asker::Operator } else { Asker::Member });
        }
        if let Some(keys) = &self.keys {
            let encoded = request.get_ref().encode_to_vec();
            return match verify_operator(&keys.current(), request.metadata(), method, &encoded) {
                Ok(()) => Ok(Asker::Operator),
                Err(error) => Err(Status::unauthenticated(match error {
                    OperatorProofError::Missing => "only the operator may ask: no operator proof",
                    OperatorProofError::Malformed => "the operator proof is malformed",
                    OperatorProofError::Stale => "the operator proof is too old (or the clocks are far apart)",
                    OperatorProofError::Bad => "the operator proof does not verify",
                })),
            };
        }
        // A token alone (checked above), or nothing: whoever passed is the operator.
        Ok(Asker::Operator)
    }

    /// Whether the caller's client certificate (checked against the CA by the handshake) names the operator.
    fn certificate_names_operator<T>(&self, request: &Request<T>) -> bool {
        let certificates =
            request.extensions().get::<TlsConnectInfo<ConnectionInfo>>().and_then(TlsConnectInfo::peer_certs);
        certificates
            .as_ref()
            .and_then(|certificates| certificates.first())
            .is_some_and(|certificate| certificate_names(certificate, &self.operator_identity))
    }
}
