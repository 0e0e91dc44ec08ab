//! Identity: who may speak for a service (docs/DESIGN.md §1.6, SECURITY.md).
//!
//! The headers and the agent's port are the control path: whoever can write them can make a service scale. With a
//! mesh key, only members prove themselves:
//! - [`proof`]: the in-band headers carry a per-window proof; a header without a valid one is outside traffic —
//!   measured as an anonymous request, never named as an edge, never dialled, never answered with timings.
//! - [`peer`]: reports carry a MAC over their bytes, and the operator's questions a MAC of their own; with mutual
//!   TLS, the operator is told apart by the name in its certificate.
//! - [`keys`]: the key file, reloaded each window for rotation without a restart.

pub mod keys;
pub mod peer;
pub mod proof;

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;

pub use keys::{KeyRing, MeshKeys};
pub use proof::{HeaderRole, Rejection, RejectionCounts};

use crate::measure::headers::CallerHeader;
use proof::{Claim, ProofCache, WindowSigned, proof_fields};

/// A tracer's membership of the mesh: its keys, the headers it signs each window, and the proofs it has checked.
pub(crate) struct Membership {
    pub keys: Arc<KeyRing>,
    service: Arc<str>,
    agent: Option<Arc<str>>,
    caller_header: WindowSigned<HeaderValue>,
    timing_proof: WindowSigned<Bytes>,
    checked: ProofCache,
    pub rejections: RejectionCounts,
}

impl Membership {
    pub fn new(keys: Arc<KeyRing>, service: Arc<str>, agent: Option<Arc<str>>) -> Self {
        Self {
            keys,
            service,
            agent,
            caller_header: WindowSigned::new(),
            timing_proof: WindowSigned::new(),
            checked: ProofCache::new(),
            rejections: RejectionCounts::default(),
        }
    }

    fn claim(&self, window_id: u64) -> Claim<'_> {
        Claim { service: &self.service, agent: self.agent.as_deref(), window_id }
    }

    /// This service's `rootscale-caller` for `window_id`, signed once per window.
    pub fn caller_header(&self, window_id: u64) -> HeaderValue {
        self.caller_header.get(window_id, || {
            let fields = proof_fields(&self.keys.current(), HeaderRole::Caller, &self.claim(window_id));
            CallerHeader::encode_with_proof(&self.service, self.agent.as_deref(), &fields)
        })
    }

    /// The `;i=…;p=…` that ends this service's `rootscale-timing` in `window_id`.
    pub fn timing_proof(&self, window_id: u64) -> Bytes {
        self.timing_proof.get(window_id, || {
            Bytes::from(proof_fields(&self.keys.current(), HeaderRole::Timing, &self.claim(window_id)))
        })
    }

    /// Checks a received header's claim; a refusal is counted by header and reason.
    pub fn verify(
        &self,
        role: HeaderRole,
        service: &str,
        agent: Option<&str>,
        proof: Option<(u64, &[u8])>,
        now_window: u64,
    ) -> Result<(), Rejection> {
        let outcome = match proof {
            None => Err(Rejection::MissingProof),
            Some((window_id, proof)) => {
                let claim = Claim { service, agent, window_id };
                self.checked.check(&self.keys, role, &claim, Some(proof), now_window)
            }
        };
        if let Err(reason) = outcome {
            self.rejections.count(role, reason);
        }
        outcome
    }

    /// Reads the key file again; on a change, the signed headers are made anew with the new keys, and every proof
    /// is checked again.
    pub fn reload_keys(&self) -> Result<bool, crate::Error> {
        let changed = self.keys.reload()?;
        if changed {
            self.caller_header.clear();
            self.timing_proof.clear();
            self.checked.clear();
        }
        Ok(changed)
    }
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("service", &self.service).field("keys", &self.keys).finish()
    }
}
