//! Membership proofs in the in-band headers.
//!
//! A proof is the first [`PROOF_BYTES`] of HMAC-SHA256 under the mesh key over (what the header is, the service it
//! names, the agent address it names, the window id), written as lowercase hex in the header's `p` field after the
//! window id in `i`. It is made once per window per service ([`WindowSigned`]) and checked once per distinct value
//! per window ([`ProofCache`]), so a request pays for a lookup, not for an HMAC.
//!
//! The proof covers who speaks and where its agent is, not the timing numbers beside it: those change on every
//! response and are bounded by the parser anyway. A proof seen by a third party (a caller header sent to an
//! outside API) can be replayed within its window, but only to name the same service at the same agent address —
//! which points at the real member, never at the replayer.

use std::{
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwapOption;

use crate::identity::keys::{KeyRing, MeshKeys};

/// Bytes of the MAC a header carries (128 bits).
pub const PROOF_BYTES: usize = 16;
/// Its length in hex.
pub const PROOF_HEX: usize = 2 * PROOF_BYTES;
/// Windows a proof is accepted either side of the receiver's own (clock skew, a request across a boundary).
pub const WINDOW_SKEW: u64 = 1;
/// Entries in each verification cache; a full slot is overwritten, so the cache never grows.
const CACHE_SLOTS: usize = 256;

/// Which header a proof is for: a caller's proof cannot be passed off as a responder's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderRole {
    Caller,
    Timing,
}

impl HeaderRole {
    fn domain(self) -> &'static [u8] {
        match self {
            HeaderRole::Caller => b"rootscale-caller/1",
            HeaderRole::Timing => b"rootscale-timing/1",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HeaderRole::Caller => "caller",
            HeaderRole::Timing => "timing",
        }
    }
}

/// What a header claims.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    pub service: &'a str,
    pub agent: Option<&'a str>,
    pub window_id: u64,
}

impl Claim<'_> {
    fn sign(&self, keys: &MeshKeys, role: HeaderRole) -> [u8; PROOF_HEX] {
        let tag = keys.sign(&self.parts(role, &self.window_id.to_be_bytes()));
        hex(&tag.as_ref()[..PROOF_BYTES])
    }

    fn parts<'p>(&'p self, role: HeaderRole, window: &'p [u8; 8]) -> [&'p [u8]; 4] {
        [role.domain(), self.service.as_bytes(), self.agent.unwrap_or_default().as_bytes(), window]
    }
}

fn hex(bytes: &[u8]) -> [u8; PROOF_HEX] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; PROOF_HEX];
    for (i, byte) in bytes.iter().take(PROOF_BYTES).enumerate() {
        out[2 * i] = DIGITS[usize::from(byte >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(byte & 0x0f)];
    }
    out
}

/// Lowercase hex of exactly [`PROOF_BYTES`] bytes, decoded; anything else is `None`.
fn unhex(text: &[u8]) -> Option<[u8; PROOF_BYTES]> {
    if text.len() != PROOF_HEX {
        return None;
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; PROOF_BYTES];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Whether `text` is a well-formed proof: exactly [`PROOF_HEX`] lowercase hex digits (the parser's check).
pub fn is_proof_text(text: &[u8]) -> bool {
    text.len() == PROOF_HEX && text.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// Why a header was taken as outside traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// No proof at all: a client that is not a member, or a member without the mesh key.
    MissingProof,
    /// A proof for a window too far from ours: replayed, or a clock far off.
    StaleWindow,
    /// A proof that does not verify under any key in force: forged, or another mesh's key.
    BadProof,
}

impl Rejection {
    pub const ALL: [Rejection; 3] = [Rejection::MissingProof, Rejection::StaleWindow, Rejection::BadProof];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::MissingProof => "missing_proof",
            Rejection::StaleWindow => "stale_window",
            Rejection::BadProof => "bad_proof",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One header value signed for one window.
pub(crate) struct Signed<T> {
    pub window_id: u64,
    pub value: T,
}

/// A value signed once per window and shared by every request in it. Reading it is lock-free; when the window
/// turns, the first request to notice signs the new one (racing requests may each sign; one wins, all are valid).
pub(crate) struct WindowSigned<T> {
    cell: ArcSwapOption<Signed<T>>,
}

impl<T: Clone> WindowSigned<T> {
    pub fn new() -> Self {
        Self { cell: ArcSwapOption::empty() }
    }

    pub fn get(&self, window_id: u64, sign: impl FnOnce() -> T) -> T {
        let current = self.cell.load();
        if let Some(signed) = current.as_ref()
            && signed.window_id == window_id
        {
            return signed.value.clone();
        }
        let value = sign();
        // Only replace what was read: if the keys were swapped meanwhile (which clears the cell), keep that.
        let _ = self.cell.compare_and_swap(&current, Some(Arc::new(Signed { window_id, value: value.clone() })));
        value
    }

    /// Forget the signed value (the keys changed).
    pub fn clear(&self) {
        self.cell.store(None);
    }
}

/// A verified (or refused) claim, remembered for its window. The proof is kept as the header's text, so a hit
/// costs comparisons only.
struct Entry {
    role: HeaderRole,
    window_id: u64,
    service: Box<str>,
    agent: Box<str>,
    proof: [u8; PROOF_HEX],
    valid: bool,
}

impl Entry {
    fn matches(&self, role: HeaderRole, claim: &Claim<'_>, proof: &[u8]) -> bool {
        self.role == role
            && self.window_id == claim.window_id
            && self.proof.as_slice() == proof
            && &*self.service == claim.service
            && &*self.agent == claim.agent.unwrap_or_default()
    }
}

/// Remembers the outcome of checking each distinct (claim, proof) per window, in a fixed number of slots. Each slot
/// has its own lock, taken with `try_lock` only: a request never waits; on contention it checks the HMAC itself.
pub(crate) struct ProofCache {
    slots: Box<[Mutex<Option<Entry>>]>,
}

impl ProofCache {
    pub fn new() -> Self {
        Self { slots: (0..CACHE_SLOTS).map(|_| Mutex::new(None)).collect() }
    }

    /// The slot of a proof: its text is a MAC (or a forgery), spread evenly enough to index by. A forger who picks
    /// texts that share a slot only evicts entries, so costs an HMAC per request — one request each.
    fn slot(&self, role: HeaderRole, proof: &[u8]) -> &Mutex<Option<Entry>> {
        let mut hasher = rustc_hash::FxHasher::default();
        (role as u8, proof).hash(&mut hasher);
        &self.slots[(hasher.finish() as usize) % self.slots.len()]
    }

    /// Forgets every outcome (the keys changed).
    pub fn clear(&self) {
        for slot in &self.slots {
            *slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        }
    }

    /// Checks `proof` (the header's hex text, if any) for `claim` made in a window near `now_window`.
    pub fn check(
        &self,
        keys: &KeyRing,
        role: HeaderRole,
        claim: &Claim<'_>,
        proof: Option<&[u8]>,
        now_window: u64,
    ) -> Result<(), Rejection> {
        let Some(proof) = proof else { return Err(Rejection::MissingProof) };
        if claim.window_id.abs_diff(now_window) > WINDOW_SKEW {
            return Err(Rejection::StaleWindow);
        }
        let Ok(text) = <[u8; PROOF_HEX]>::try_from(proof) else { return Err(Rejection::BadProof) };
        let slot = self.slot(role, &text);
        if let Ok(entry) = slot.try_lock()
            && let Some(entry) = entry.as_ref()
            && entry.matches(role, claim, &text)
        {
            return if entry.valid { Ok(()) } else { Err(Rejection::BadProof) };
        }
        // The parser has checked the text already; a value that is not hex is a forgery either way.
        let window = claim.window_id.to_be_bytes();
        let valid = unhex(&text).is_some_and(|mac| keys.current().verify(&claim.parts(role, &window), &mac));
        if let Ok(mut entry) = slot.try_lock() {
            *entry = Some(Entry {
                role,
                window_id: claim.window_id,
                service: claim.service.into(),
                agent: claim.agent.unwrap_or_default().into(),
                proof: text,
                valid,
            });
        }
        if valid { Ok(()) } else { Err(Rejection::BadProof) }
    }
}

/// Headers refused as outside traffic, by header and reason.
#[derive(Debug, Default)]
pub struct RejectionCounts {
    caller: [std::sync::atomic::AtomicU64; 3],
    timing: [std::sync::atomic::AtomicU64; 3],
}

impl RejectionCounts {
    pub(crate) fn count(&self, role: HeaderRole, reason: Rejection) {
        let row = match role {
            HeaderRole::Caller => &self.caller,
            HeaderRole::Timing => &self.timing,
        };
        row[reason.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many `role` headers were refused for `reason`.
    pub fn get(&self, role: HeaderRole, reason: Rejection) -> u64 {
        let row = match role {
            HeaderRole::Caller => &self.caller,
            HeaderRole::Timing => &self.timing,
        };
        row[reason.index()].load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The `;i=<window>;p=<proof>` field pair for `claim`, signed with the keys in force.
pub(crate) fn proof_fields(keys: &MeshKeys, role: HeaderRole, claim: &Claim<'_>) -> String {
    let proof = claim.sign(keys, role);
    // The proof is ASCII hex by construction.
    format!(";i={};p={}", claim.window_id, std::str::from_utf8(&proof).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(key: &str) -> KeyRing {
        KeyRing::fixed(MeshKeys::parse(key).unwrap())
    }

    const KEY: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCD";
    const OTHER: &str = "ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxw";

    fn proof_of(fields: &str) -> &[u8] {
        fields.rsplit_once(";p=").unwrap().1.as_bytes()
    }

    #[test]
    fn a_proof_verifies_for_its_claim_only() {
        let keys = ring(KEY);
        let cache = ProofCache::new();
        let claim = Claim { service: "cart", agent: Some("127.0.0.1:9797"), window_id: 100 };
        let fields = proof_fields(&keys.current(), HeaderRole::Caller, &claim);
        assert!(fields.starts_with(";i=100;p="), "{fields}");
        let proof = proof_of(&fields);
        for _ in 0..2 {
            // Twice: the second answer comes from the cache.
            assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, Some(proof), 100), Ok(()));
        }
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, Some(proof), 101), Ok(()), "one window of skew");
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, Some(proof), 102), Err(Rejection::StaleWindow));
        assert_eq!(cache.check(&keys, HeaderRole::Timing, &claim, Some(proof), 100), Err(Rejection::BadProof));
        let elsewhere = Claim { agent: Some("127.0.0.2:9797"), ..claim };
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &elsewhere, Some(proof), 100), Err(Rejection::BadProof));
        let other_name = Claim { service: "carts", ..claim };
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &other_name, Some(proof), 100), Err(Rejection::BadProof));
        let fresh = ProofCache::new();
        assert_eq!(fresh.check(&ring(OTHER), HeaderRole::Caller, &claim, Some(proof), 100), Err(Rejection::BadProof));
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, None, 100), Err(Rejection::MissingProof));
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, Some(b"00"), 100), Err(Rejection::BadProof));
    }

    #[test]
    fn a_refused_value_stays_refused_from_the_cache() {
        let keys = ring(KEY);
        let cache = ProofCache::new();
        let claim = Claim { service: "cart", agent: None, window_id: 7 };
        let forged = [b'a'; PROOF_HEX];
        for _ in 0..3 {
            assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, Some(&forged), 7), Err(Rejection::BadProof));
        }
    }

    #[test]
    fn a_window_signed_value_is_made_once_per_window() {
        let signed = WindowSigned::new();
        let mut made = 0;
        for window in [5, 5, 5, 6, 6] {
            let value = signed.get(window, || {
                made += 1;
                window * 10
            });
            assert_eq!(value, window * 10);
        }
        assert_eq!(made, 2);
        signed.clear();
        assert_eq!(signed.get(6, || 61), 61);
    }

    #[test]
    fn hex_round_trips_and_rejects_upper_case() {
        let bytes: Vec<u8> = (0..16).map(|i| i * 17).collect();
        let text = hex(&bytes);
        assert_eq!(unhex(&text).unwrap().to_vec(), bytes);
        assert!(unhex(&text.to_ascii_uppercase()).is_none(), "the text has letters a-f");
        assert!(unhex(b"0g000000000000000000000000000000").is_none());
    }
}
