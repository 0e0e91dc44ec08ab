//! Identity: who may speak for a service (docs/DESIGN.md §1.6, SECURITY.md).
//!
//! The headers and the agent's port are the control path: whoever can write them can make a service scale. With a
//! mesh key, only members prove themselves:
//! - [`proof`]: the in-band headers carry a per-window proof; a header without a valid one is outside traffic —
//!   measured as an anonymous request, never named as an edge, never dialled, never answered with timings.
//! - [`peer`]: reports carry a MAC over their bytes, and the operator's questions a MAC of their own; with mutual
//!   TLS, the operator is told apart by the name in its certificate.
//! - [`believed`]: the header ends each thread has checked, known again by their bytes for the rest of the window.
//! - [`keys`]: the key file, reloaded each window for rotation without a restart.

pub mod believed;
pub mod keys;
pub mod peer;
pub mod proof;

use std::{
    cell::RefCell,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http::HeaderValue;

pub use keys::{KeyRing, MeshKeys};
pub use proof::{HeaderRole, Rejection, RejectionCounts};

use crate::measure::headers::CallerHeader;
use proof::{Claim, ProofCache, proof_fields, resolve_window};

/// A tracer's membership of the mesh: its keys, the headers it signs each window, and the proofs it has checked.
pub(crate) struct Membership {
    pub keys: Arc<KeyRing>,
    service: Arc<str>,
    agent: Option<Arc<str>>,
    checked: ProofCache,
    pub rejections: RejectionCounts,
    /// The window now, as the window closer last set it: proofs are made and checked for it without reading the
    /// clock on the request path. It lags the clock by at most the closer's grace, within [`proof::WINDOW_SKEW`].
    current_window: AtomicU64,
    /// Tells this membership's headers from other tracers' in the threads' caches.
    id: u64,
    /// Bumped when the keys change: headers signed with older keys are signed anew.
    generation: AtomicU64,
    /// The sampling rate's N: its weighted caller header is signed with the others.
    sample_every: u32,
}

/// The headers one thread signed for one tracer and window: each thread signs its own once per window (two HMACs),
/// so the request path reads a thread-local value — no lock, no shared atomic.
struct SignedHere {
    owner: u64,
    generation: u64,
    window_id: u64,
    caller: HeaderValue,
    /// The caller header for requests left out of the sample: the same proof, marked `u=1`.
    unsampled_caller: HeaderValue,
    /// The caller header for requests this service drew at its own rate 1/N (`w=N`), when it samples.
    weighted_caller: Option<HeaderValue>,
    /// The proof fields of the caller header: for a weight another service drew at another rate.
    caller_proof: Box<str>,
    timing: Bytes,
}

/// Tracers whose headers one thread keeps signed at once (more, in one thread, take turns).
const SIGNED_PER_THREAD: usize = 8;

struct ThreadSigned {
    entries: [Option<SignedHere>; SIGNED_PER_THREAD],
    /// The slot read last.
    last: usize,
    /// The slot a tracer new to this thread takes.
    next: usize,
}

thread_local! {
    static SIGNED: RefCell<ThreadSigned> =
        const { RefCell::new(ThreadSigned { entries: [const { None }; SIGNED_PER_THREAD], last: 0, next: 0 }) };
}

static NEXT_MEMBERSHIP_ID: AtomicU64 = AtomicU64::new(1);

impl Membership {
    /// `sample_every` is this service's sampling rate's N (1: every request): the weight it marks its own draws
    /// with.
    pub fn new(
        keys: Arc<KeyRing>,
        service: Arc<str>,
        agent: Option<Arc<str>>,
        current_window: u64,
        sample_every: u32,
    ) -> Self {
        Self {
            sample_every,
            current_window: AtomicU64::new(current_window),
            keys,
            service,
            agent,
            checked: ProofCache::new(),
            rejections: RejectionCounts::default(),
            id: NEXT_MEMBERSHIP_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
        }
    }

    /// The window proofs are made and checked for now.
    pub fn current_window(&self) -> u64 {
        self.current_window.load(Ordering::Relaxed)
    }

    /// Window `window_id` began (the closer closed the one before it).
    pub fn window_began(&self, window_id: u64) {
        self.current_window.fetch_max(window_id, Ordering::Relaxed);
    }

    fn claim(&self, window_id: u64) -> Claim<'_> {
        let agent = self.agent.as_deref().unwrap_or_default();
        Claim { service: self.service.as_bytes(), agent: agent.as_bytes(), window_id }
    }

    fn sign(&self, window_id: u64, generation: u64) -> SignedHere {
        let keys = self.keys.current();
        let caller = proof_fields(&keys, HeaderRole::Caller, &self.claim(window_id));
        SignedHere {
            owner: self.id,
            generation,
            window_id,
            caller: self.caller_with(&caller, Some(1)),
            unsampled_caller: self.caller_with(&caller, None),
            weighted_caller: (self.sample_every > 1).then(|| self.caller_with(&caller, Some(self.sample_every))),
            caller_proof: caller.into(),
            timing: Bytes::from(proof_fields(&keys, HeaderRole::Timing, &self.claim(window_id))),
        }
    }

    fn caller_with(&self, proof_fields: &str, weight: Option<u32>) -> HeaderValue {
        CallerHeader::encode_with_proof(&self.service, self.agent.as_deref(), proof_fields, weight)
    }

    /// `read` of this thread's signed headers for `window_id`, signed now if they are not yet.
    fn with_signed<R>(&self, window_id: u64, read: impl FnOnce(&SignedHere) -> R) -> R {
        let generation = self.generation.load(Ordering::Relaxed);
        SIGNED.with(|signed| {
            let Ok(mut signed) = signed.try_borrow_mut() else {
                // Re-entered from inside `read` (never, today): sign without keeping it.
                return read(&self.sign(window_id, generation));
            };
            let ours = |entry: &SignedHere| entry.owner == self.id && entry.generation == generation;
            // The slot used last is the likely one: most threads serve one tracer.
            if let Some(entry) = &signed.entries[signed.last]
                && ours(entry)
                && entry.window_id == window_id
            {
                return read(entry);
            }
            let slot = match signed.entries.iter().position(|entry| entry.as_ref().is_some_and(ours)) {
                Some(slot) => slot,
                None => {
                    let slot = signed.next;
                    signed.next = (slot + 1) % SIGNED_PER_THREAD;
                    slot
                }
            };
            signed.last = slot;
            match &signed.entries[slot] {
                Some(entry) if entry.window_id == window_id => read(entry),
                _ => {
                    let entry = self.sign(window_id, generation);
                    let result = read(&entry);
                    signed.entries[slot] = Some(entry);
                    result
                }
            }
        })
    }

    /// This service's `rootscale-caller` for `window_id`, for a request measured with `weight` or left out of the
    /// sample (`None`). Signed once per window and thread, but for a weight another service drew at another rate.
    pub fn caller_header(&self, window_id: u64, weight: Option<u32>) -> HeaderValue {
        self.with_signed(window_id, |signed| match weight {
            None => signed.unsampled_caller.clone(),
            Some(1) => signed.caller.clone(),
            Some(weight) if weight == self.sample_every => {
                signed.weighted_caller.clone().unwrap_or_else(|| self.caller_with(&signed.caller_proof, Some(weight)))
            }
            Some(weight) => self.caller_with(&signed.caller_proof, Some(weight)),
        })
    }

    /// `write` of the `;i=…;p=…` that ends this service's `rootscale-timing` in `window_id`.
    pub fn with_timing_proof<R>(&self, window_id: u64, write: impl FnOnce(&[u8]) -> R) -> R {
        self.with_signed(window_id, |signed| write(&signed.timing))
    }

    /// The generation of the keys: bumped when they change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Checks a received header's claim: the window its proof was made in, or why it is refused (counted by header
    /// and reason).
    pub fn verify(
        &self,
        role: HeaderRole,
        service: &[u8],
        agent: &[u8],
        proof: Option<(u64, &[u8])>,
        now_window: u64,
    ) -> Result<u64, Rejection> {
        let outcome = match proof {
            None => Err(Rejection::MissingProof),
            Some((tag, proof)) => match resolve_window(tag, now_window) {
                None => Err(Rejection::StaleWindow),
                Some(window_id) => {
                    let claim = Claim { service, agent, window_id };
                    self.checked.check(&self.keys, role, &claim, Some(proof), now_window).map(|()| window_id)
                }
            },
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
            self.generation.fetch_add(1, Ordering::Relaxed);
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
