//! Who is calling the agent's port.
//!
//! - A neighbour's report carries `rootscale-proof`: HMAC-SHA256 under the mesh key over the report's encoded
//!   bytes. Reports go only to agents learned from verified headers, so no outsider ever sees one.
//! - The operator's `Advisor` calls carry `rootscale-operator-proof: <unix seconds>.<HMAC over the method, the time
//!   and the request's bytes>`, accepted within [`OPERATOR_PROOF_SKEW_S`] of the agent's clock.
//! - With mutual TLS, a caller whose certificate names the operator's identity (a DNS SAN, by default
//!   [`DEFAULT_OPERATOR_IDENTITY`]) is the operator; any other certificate from the CA is a member.

use std::time::{SystemTime, UNIX_EPOCH};

use tonic::metadata::{AsciiMetadataValue, MetadataMap};

use crate::identity::keys::{MeshKeys, constant_time_eq};

/// Metadata key of a report's MAC.
pub const REPORT_PROOF_METADATA: &str = "rootscale-proof";
/// Metadata key of the operator's proof.
pub const OPERATOR_PROOF_METADATA: &str = "rootscale-operator-proof";
/// The name the operator's client certificate carries by default.
pub const DEFAULT_OPERATOR_IDENTITY: &str = "rootscale-operator";
/// How far the operator's clock may be from the agent's.
pub const OPERATOR_PROOF_SKEW_S: u64 = 120;

const REPORT_DOMAIN: &[u8] = b"rootscale-report/1";
const OPERATOR_DOMAIN: &[u8] = b"rootscale-operator/1";

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(2 * bytes.len()), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

/// The MAC a report is sent with.
pub fn report_proof(keys: &MeshKeys, encoded_report: &[u8]) -> AsciiMetadataValue {
    let tag = keys.sign(&[REPORT_DOMAIN, encoded_report]);
    // Lowercase hex is always a valid metadata value.
    hex(tag.as_ref()).parse().unwrap_or_else(|_| AsciiMetadataValue::from_static("invalid"))
}

/// Whether `metadata` carries a valid MAC for `encoded_report`.
pub fn verify_report(keys: &MeshKeys, metadata: &MetadataMap, encoded_report: &[u8]) -> bool {
    let Some(proof) = metadata.get(REPORT_PROOF_METADATA).and_then(|value| value.to_str().ok()).and_then(unhex) else {
        return false;
    };
    keys.verify(&[REPORT_DOMAIN, encoded_report], &proof) && proof.len() == 32
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

/// The proof the operator sends with an `Advisor` call (`method` is the RPC's name, e.g. `Recommend`).
pub fn operator_proof(keys: &MeshKeys, method: &str, encoded_request: &[u8]) -> AsciiMetadataValue {
    operator_proof_at(keys, method, encoded_request, unix_seconds())
}

fn operator_proof_at(keys: &MeshKeys, method: &str, encoded_request: &[u8], at: u64) -> AsciiMetadataValue {
    let seconds = at.to_string();
    let tag = keys.sign(&[OPERATOR_DOMAIN, method.as_bytes(), seconds.as_bytes(), encoded_request]);
    format!("{seconds}.{}", hex(tag.as_ref())).parse().unwrap_or_else(|_| AsciiMetadataValue::from_static("invalid"))
}

/// Why an operator proof was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperatorProofError {
    Missing,
    Malformed,
    Stale,
    Bad,
}

/// Checks the operator's proof for a call of `method` with `encoded_request`.
pub fn verify_operator(
    keys: &MeshKeys,
    metadata: &MetadataMap,
    method: &str,
    encoded_request: &[u8],
) -> Result<(), OperatorProofError> {
    let value = metadata.get(OPERATOR_PROOF_METADATA).ok_or(OperatorProofError::Missing)?;
    let text = value.to_str().map_err(|_| OperatorProofError::Malformed)?;
    let (seconds, proof) = text.split_once('.').ok_or(OperatorProofError::Malformed)?;
    if seconds.is_empty() || seconds.len() > 12 || !seconds.bytes().all(|b| b.is_ascii_digit()) {
        return Err(OperatorProofError::Malformed);
    }
    let at: u64 = seconds.parse().map_err(|_| OperatorProofError::Malformed)?;
    let proof = unhex(proof).ok_or(OperatorProofError::Malformed)?;
    if at.abs_diff(unix_seconds()) > OPERATOR_PROOF_SKEW_S {
        return Err(OperatorProofError::Stale);
    }
    if keys.verify(&[OPERATOR_DOMAIN, method.as_bytes(), seconds.as_bytes(), encoded_request], &proof) {
        Ok(())
    } else {
        Err(OperatorProofError::Bad)
    }
}

/// Whether the client certificate a TLS peer presented (already verified against the CA by the handshake) is
/// valid for the DNS name `identity`.
pub fn certificate_names(certificate: &[u8], identity: &str) -> bool {
    let Ok(name) = rustls_pki_types::ServerName::try_from(identity) else { return false };
    let der = rustls_pki_types::CertificateDer::from(certificate);
    let Ok(certificate) = webpki::EndEntityCert::try_from(&der) else { return false };
    certificate.verify_is_valid_for_subject_name(&name).is_ok()
}

/// Whether two tokens are equal, in time that depends only on their length.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    constant_time_eq(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(key: &str) -> MeshKeys {
        MeshKeys::parse(key).unwrap()
    }

    const KEY: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCD";
    const OTHER: &str = "ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxw";

    #[test]
    fn a_report_mac_covers_its_bytes() {
        let mut metadata = MetadataMap::new();
        metadata.insert(REPORT_PROOF_METADATA, report_proof(&keys(KEY), b"report"));
        assert!(verify_report(&keys(KEY), &metadata, b"report"));
        assert!(!verify_report(&keys(KEY), &metadata, b"reporT"));
        assert!(!verify_report(&keys(OTHER), &metadata, b"report"));
        assert!(!verify_report(&keys(KEY), &MetadataMap::new(), b"report"));
    }

    #[test]
    fn an_operator_proof_covers_method_time_and_bytes() {
        let key = keys(KEY);
        let mut metadata = MetadataMap::new();
        metadata.insert(OPERATOR_PROOF_METADATA, operator_proof(&key, "Recommend", b"question"));
        assert_eq!(verify_operator(&key, &metadata, "Recommend", b"question"), Ok(()));
        assert_eq!(verify_operator(&key, &metadata, "Snapshot", b"question"), Err(OperatorProofError::Bad));
        assert_eq!(verify_operator(&key, &metadata, "Recommend", b"questioN"), Err(OperatorProofError::Bad));
        assert_eq!(verify_operator(&keys(OTHER), &metadata, "Recommend", b"question"), Err(OperatorProofError::Bad));
        let old = operator_proof_at(&key, "Recommend", b"question", unix_seconds() - 3600);
        metadata.insert(OPERATOR_PROOF_METADATA, old);
        assert_eq!(verify_operator(&key, &metadata, "Recommend", b"question"), Err(OperatorProofError::Stale));
        metadata.insert(OPERATOR_PROOF_METADATA, AsciiMetadataValue::from_static("12.zz"));
        assert_eq!(verify_operator(&key, &metadata, "Recommend", b"question"), Err(OperatorProofError::Malformed));
        assert_eq!(verify_operator(&key, &MetadataMap::new(), "Recommend", b""), Err(OperatorProofError::Missing));
    }
}
