//! Membership proofs in the in-band headers.
//!
//! A proof is the first [`PROOF_BYTES`] of HMAC-SHA256 under the mesh key over (what the header is, the service it
//! names, the agent address it names, the window id), written as base64url in the header's `p` field after the
//! window's tag in `i`. It is made once per window per service and thread (`Membership`) and checked once per
//! distinct value per window ([`ProofCache`]), so a request pays for a comparison, not for an HMAC.
//!
//! The proof covers who speaks and where its agent is, not the timing numbers beside it: those change on every
//! response and are bounded by the parser anyway. A proof seen by a third party (a caller header sent to an
//! outside API) can be replayed within its window, but only to name the same service at the same agent address —
//! which points at the real member, never at the replayer.

use std::sync::Mutex;

use crate::identity::keys::{KeyRing, MeshKeys};

/// Bytes of the MAC a header carries (96 bits, as HMAC-SHA256-96 in IPsec): a forger needs about 2^95 tries for
/// one window, and a window lasts seconds.
pub const PROOF_BYTES: usize = 12;
/// Its length as text: base64url, no padding (every 3 bytes make 4 characters).
pub const PROOF_TEXT: usize = PROOF_BYTES / 3 * 4;
/// Windows a proof is accepted either side of the receiver's own (clock skew, a request across a boundary).
pub const WINDOW_SKEW: u64 = 1;
/// A header names its window by the window id modulo this (`i`, at most three digits): the receiver knows the
/// window to within [`WINDOW_SKEW`], so the remainder picks it, and the MAC covers the whole id.
pub const WINDOW_TAG_MODULUS: u64 = 256;

/// The window a header's tag names, among those within [`WINDOW_SKEW`] (one) of `now`; `None` when none has that
/// tag.
pub fn resolve_window(tag: u64, now: u64) -> Option<u64> {
    if tag >= WINDOW_TAG_MODULUS {
        return None;
    }
    // How far the tag is ahead of now's, modulo the tag's range: 0 (now), 1 (the next window) or the range less one
    // (the previous window).
    match (tag + WINDOW_TAG_MODULUS - now % WINDOW_TAG_MODULUS) % WINDOW_TAG_MODULUS {
        0 => Some(now),
        1 => now.checked_add(1),
        ahead if ahead == WINDOW_TAG_MODULUS - 1 => now.checked_sub(1),
        _ => None,
    }
}
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

/// What a header claims, as the header's bytes (an absent agent is empty).
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    pub service: &'a [u8],
    pub agent: &'a [u8],
    pub window_id: u64,
}

impl Claim<'_> {
    fn sign(&self, keys: &MeshKeys, role: HeaderRole) -> [u8; PROOF_TEXT] {
        let tag = keys.sign(&self.parts(role, &self.window_id.to_be_bytes()));
        encode(&tag.as_ref()[..PROOF_BYTES])
    }

    fn parts<'p>(&'p self, role: HeaderRole, window: &'p [u8; 8]) -> [&'p [u8]; 4] {
        [role.domain(), self.service, self.agent, window]
    }
}

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The proof's text: base64url of [`PROOF_BYTES`] bytes.
fn encode(bytes: &[u8]) -> [u8; PROOF_TEXT] {
    let mut out = [0u8; PROOF_TEXT];
    for (group, chunk) in bytes.chunks_exact(3).take(PROOF_BYTES / 3).enumerate() {
        let bits = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
        for (k, out) in out[4 * group..4 * group + 4].iter_mut().enumerate() {
            *out = BASE64URL[((bits >> (18 - 6 * k)) & 63) as usize];
        }
    }
    out
}

/// A proof's text decoded: exactly [`PROOF_TEXT`] base64url characters; anything else is `None`. Every text of that
/// length decodes to one value and back, so two texts never stand for the same proof.
fn decode(text: &[u8]) -> Option<[u8; PROOF_BYTES]> {
    let text: &[u8; PROOF_TEXT] = text.try_into().ok()?;
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    };
    let mut out = [0u8; PROOF_BYTES];
    for (group, chunk) in text.chunks_exact(4).enumerate() {
        let mut bits = 0u32;
        for &c in chunk {
            bits = bits << 6 | u32::from(value(c)?);
        }
        out[3 * group] = (bits >> 16) as u8;
        out[3 * group + 1] = (bits >> 8) as u8;
        out[3 * group + 2] = bits as u8;
    }
    Some(out)
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

/// A verified (or refused) claim, remembered for its window. The proof is kept as the header's text, so a hit
/// costs comparisons only.
struct Entry {
    role: HeaderRole,
    window_id: u64,
    service: Box<[u8]>,
    agent: Box<[u8]>,
    proof: [u8; PROOF_TEXT],
    valid: bool,
}

impl Entry {
    fn matches(&self, role: HeaderRole, claim: &Claim<'_>, proof: &[u8]) -> bool {
        self.role == role
            && self.window_id == claim.window_id
            && self.proof.as_slice() == proof
            && &*self.service == claim.service
            && &*self.agent == claim.agent
    }
}

/// Remembers the outcome of checking each distinct (claim, proof) per window, in a fixed number of slots. Each slot
/// has its own lock, taken with `try_lock` only: a request never waits; on contention it checks the HMAC itself.
/// In front of it, each thread recognises the headers it has believed lately ([`crate::identity::believed`]), so the
/// usual request does not come here at all.
pub(crate) struct ProofCache {
    slots: Box<[Mutex<Option<Entry>>]>,
}

impl ProofCache {
    pub fn new() -> Self {
        Self { slots: (0..CACHE_SLOTS).map(|_| Mutex::new(None)).collect() }
    }

    /// The slot of a proof: its text is a MAC (or a forgery), spread evenly enough to index by. A forger who picks
    /// texts that share a slot only evicts entries, so costs an HMAC per request — one request each.
    fn slot(&self, role: HeaderRole, proof: &[u8; PROOF_TEXT]) -> &Mutex<Option<Entry>> {
        let head = u64::from_le_bytes([proof[0], proof[1], proof[2], proof[3], proof[4], proof[5], proof[6], proof[7]]);
        let mixed = (head ^ role as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        &self.slots[(mixed as usize) % self.slots.len()]
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
        // (Callers resolve a header's tag to a window first; a window out of reach is stale either way.)
        let Ok(text) = <[u8; PROOF_TEXT]>::try_from(proof) else { return Err(Rejection::BadProof) };
        let slot = self.slot(role, &text);
        let known = match slot.try_lock() {
            Ok(entry) => entry.as_ref().filter(|entry| entry.matches(role, claim, &text)).map(|entry| entry.valid),
            Err(_) => None,
        };
        let valid = known.unwrap_or_else(|| {
            // A text that is not base64url is a forgery: it never verifies.
            let window = claim.window_id.to_be_bytes();
            let valid = decode(&text).is_some_and(|mac| keys.current().verify(&claim.parts(role, &window), &mac));
            if let Ok(mut slot) = slot.try_lock() {
                *slot = Some(Entry {
                    role,
                    window_id: claim.window_id,
                    service: claim.service.into(),
                    agent: claim.agent.into(),
                    proof: text,
                    valid,
                });
            }
            valid
        });
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
    fn counter(&self, role: HeaderRole, reason: Rejection) -> &std::sync::atomic::AtomicU64 {
        let row = match role {
            HeaderRole::Caller => &self.caller,
            HeaderRole::Timing => &self.timing,
        };
        &row[reason.index()]
    }

    pub(crate) fn count(&self, role: HeaderRole, reason: Rejection) {
        self.counter(role, reason).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many `role` headers were refused for `reason`.
    pub fn get(&self, role: HeaderRole, reason: Rejection) -> u64 {
        self.counter(role, reason).load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The `;i=<window>;p=<proof>` field pair for `claim`, signed with the keys in force.
pub(crate) fn proof_fields(keys: &MeshKeys, role: HeaderRole, claim: &Claim<'_>) -> String {
    let proof = claim.sign(keys, role);
    // The proof is base64url (`A-Z a-z 0-9 - _`) by construction: ASCII a header may hold.
    format!(";i={};p={}", claim.window_id % WINDOW_TAG_MODULUS, std::str::from_utf8(&proof).unwrap_or_default())
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
        let claim = Claim { service: b"cart", agent: b"127.0.0.1:9797", window_id: 100 };
        let fields = proof_fields(&keys.current(), HeaderRole::Caller, &claim);
        assert!(fields.starts_with(";i=100;p="), "{fields}");
        assert_eq!(resolve_window(100, 100), Some(100));
        assert_eq!(resolve_window(100, 101), Some(100));
        assert_eq!(resolve_window(100, 99), Some(100));
        assert_eq!(resolve_window(100, 102), None, "two windows away");
        assert_eq!(resolve_window(0, 255), Some(256), "the tag wraps");
        assert_eq!(resolve_window(300, 100), None, "no window has a tag over the modulus");
        assert_eq!(resolve_window(255, 0), None, "no window before the first");
        assert_eq!(resolve_window(1, 0), Some(1));
        let proof = proof_of(&fields);
        for _ in 0..2 {
            // Twice: the second answer comes from the cache.
            assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, Some(proof), 100), Ok(()));
        }
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, Some(proof), 101), Ok(()), "one window of skew");
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, Some(proof), 102), Err(Rejection::StaleWindow));
        assert_eq!(cache.check(&keys, HeaderRole::Timing, &claim, Some(proof), 100), Err(Rejection::BadProof));
        let elsewhere = Claim { agent: b"127.0.0.2:9797", ..claim };
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &elsewhere, Some(proof), 100), Err(Rejection::BadProof));
        let other_name = Claim { service: b"carts", ..claim };
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &other_name, Some(proof), 100), Err(Rejection::BadProof));
        let fresh = ProofCache::new();
        assert_eq!(fresh.check(&ring(OTHER), HeaderRole::Caller, &claim, Some(proof), 100), Err(Rejection::BadProof));
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, None, 100), Err(Rejection::MissingProof));
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, Some(b"00"), 100), Err(Rejection::BadProof));
        let mut changed = proof.to_vec();
        changed[0] = if changed[0] == b'A' { b'B' } else { b'A' };
        assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, Some(&changed), 100), Err(Rejection::BadProof));
    }

    #[test]
    fn a_refused_value_stays_refused_from_the_cache() {
        let keys = ring(KEY);
        let cache = ProofCache::new();
        let claim = Claim { service: b"cart", agent: b"", window_id: 7 };
        let forged = [b'a'; PROOF_TEXT];
        for _ in 0..3 {
            assert_eq!(cache.check(&keys, HeaderRole::Caller, &claim, Some(&forged), 7), Err(Rejection::BadProof));
        }
    }

    #[test]
    fn base64url_round_trips_and_refuses_other_characters() {
        let bytes: Vec<u8> = (0..PROOF_BYTES as u8).map(|i| i.wrapping_mul(23)).collect();
        let text = encode(&bytes);
        assert_eq!(decode(&text).unwrap().to_vec(), bytes);
        for bad in [
            &b"AAAAAAAAAAAAAAA="[..],
            b"AAAAAAAAAAAAAAA+",
            b"AAAAAAAAAAAAAAA/",
            b"AAAAAAAAAAAAAAA",
            b"AAAAAAAAAAAAAAAAA",
        ] {
            assert!(decode(bad).is_none(), "{bad:?}");
        }
    }
}
