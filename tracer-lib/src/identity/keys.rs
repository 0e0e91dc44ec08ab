//! The mesh key: a secret every member of the mesh holds (the chart keeps it in a Secret). Proofs are HMAC-SHA256
//! under it; whoever lacks it cannot make a proof, so it cannot name itself in a header, be dialled, or send a
//! report.
//!
//! A key file holds one key per line, at most [`MAX_KEYS`]: the first signs, every one verifies. Rotation without
//! a restart, with every agent reloading the file each window: add the new key as the second line (everyone accepts
//! it), then swap the lines (everyone signs with it, the old one is still accepted), then drop the old line.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use ring::hmac;

use crate::Error;

/// Shortest key accepted, in bytes: 256 bits of text from a random generator.
pub const MIN_KEY_BYTES: usize = 32;
/// Longest key accepted.
pub const MAX_KEY_BYTES: usize = 1024;
/// The shortest MAC prefix that proves anything (96 bits).
pub const MIN_PROOF_BYTES: usize = 12;
/// Keys one file may hold: the one that signs and the one being rotated in or out.
pub const MAX_KEYS: usize = 2;
/// Largest key file read.
const MAX_FILE_BYTES: u64 = 4096;

/// One set of mesh keys: the first signs, all verify.
#[derive(Clone)]
pub struct MeshKeys {
    keys: Arc<[hmac::Key]>,
    /// Tells one set from another without holding the key bytes (a digest of them).
    fingerprint: [u8; 8],
}

impl std::fmt::Debug for MeshKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshKeys").field("keys", &self.keys.len()).finish_non_exhaustive()
    }
}

fn check_key(index: usize, key: &[u8]) -> Result<(), Error> {
    if key.len() < MIN_KEY_BYTES || key.len() > MAX_KEY_BYTES {
        return Err(Error::MeshKey(format!(
            "key {} is {} bytes long: use {MIN_KEY_BYTES} to {MAX_KEY_BYTES} (for example 48 random letters and digits)",
            index + 1,
            key.len()
        )));
    }
    if !key.iter().all(u8::is_ascii_graphic) {
        return Err(Error::MeshKey(format!("key {} has characters other than visible ASCII", index + 1)));
    }
    Ok(())
}

impl MeshKeys {
    /// One key, or several (the first signs). Each is [`MIN_KEY_BYTES`] to [`MAX_KEY_BYTES`] of visible ASCII.
    pub fn new<K: AsRef<[u8]>>(keys: &[K]) -> Result<Self, Error> {
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(Error::MeshKey(format!("give 1 to {MAX_KEYS} keys, not {}", keys.len())));
        }
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for (index, key) in keys.iter().enumerate() {
            check_key(index, key.as_ref())?;
            digest.update(key.as_ref());
            digest.update(b"\n");
        }
        let mut fingerprint = [0u8; 8];
        fingerprint.copy_from_slice(&digest.finish().as_ref()[..8]);
        let keys = keys.iter().map(|key| hmac::Key::new(hmac::HMAC_SHA256, key.as_ref())).collect();
        Ok(Self { keys, fingerprint })
    }

    /// One new random key ([`GENERATED_KEY_BYTES`] letters and digits from the system's random source), for a mesh
    /// that lives in one process or one run (the local demo, tests).
    pub fn generate() -> Result<Self, Error> {
        Self::new(&[generate_key_text()?])
    }

    /// A key file's text: one key per line; blank lines and surrounding white space are ignored.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let keys: Vec<&str> = text.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
        Self::new(&keys)
    }

    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = read_key_file(path)?;
        Self::parse(&text).map_err(|error| Error::MeshKey(format!("{}: {error}", path.display())))
    }

    /// HMAC-SHA256 under the signing key over `parts`, each followed by a separator so that no two different
    /// lists of parts sign the same bytes.
    pub(crate) fn sign(&self, parts: &[&[u8]]) -> hmac::Tag {
        sign_with(&self.keys[0], parts)
    }

    /// Whether `proof` is a prefix (at least [`MIN_PROOF_BYTES`]) of the MAC of `parts` under any of the keys.
    pub(crate) fn verify(&self, parts: &[&[u8]], proof: &[u8]) -> bool {
        if proof.len() < MIN_PROOF_BYTES {
            return false;
        }
        self.keys.iter().any(|key| {
            let tag = sign_with(key, parts);
            tag.as_ref().get(..proof.len()).is_some_and(|expected| constant_time_eq(expected, proof))
        })
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

/// Length of a generated key: 48 letters and digits, about 285 bits.
pub const GENERATED_KEY_BYTES: usize = 48;

/// A new key's text, for a key file.
pub fn generate_key_text() -> Result<String, Error> {
    use ring::rand::SecureRandom as _;
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; GENERATED_KEY_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::MeshKey("the system's random source failed".into()))?;
    // 256 is not a multiple of 62: the bias toward the first letters is under 2 %, a few bits of 285.
    Ok(bytes.iter().map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()])).collect())
}

fn sign_with(key: &hmac::Key, parts: &[&[u8]]) -> hmac::Tag {
    let mut context = hmac::Context::with_key(key);
    for part in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        context.update(&(part.len() as u32).to_be_bytes());
        context.update(part);
    }
    context.sign()
}

/// Compares two byte strings in time that depends only on their length.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn read_key_file(path: &Path) -> Result<String, Error> {
    let metadata =
        std::fs::metadata(path).map_err(|error| Error::MeshKey(format!("cannot read {}: {error}", path.display())))?;
    if metadata.len() > MAX_FILE_BYTES {
        return Err(Error::MeshKey(format!("{} is larger than {MAX_FILE_BYTES} bytes", path.display())));
    }
    std::fs::read_to_string(path).map_err(|error| Error::MeshKey(format!("cannot read {}: {error}", path.display())))
}

/// The keys in force, swapped whole when the key file changes. Reading them is lock-free.
#[derive(Debug)]
pub struct KeyRing {
    keys: ArcSwap<MeshKeys>,
    file: Option<PathBuf>,
}

impl KeyRing {
    /// Fixed keys (tests, the local demo).
    pub fn fixed(keys: MeshKeys) -> Self {
        Self { keys: ArcSwap::from_pointee(keys), file: None }
    }

    /// Keys read from `path` now, and again on each [`KeyRing::reload`].
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let path = path.into();
        let keys = MeshKeys::from_file(&path)?;
        Ok(Self { keys: ArcSwap::from_pointee(keys), file: Some(path) })
    }

    pub fn current(&self) -> arc_swap::Guard<Arc<MeshKeys>> {
        self.keys.load()
    }

    /// Reads the key file again. Returns whether the keys changed; a file that cannot be read or holds bad keys
    /// keeps the keys in force (and says why), so a half-written Secret never locks a service out of its mesh.
    pub fn reload(&self) -> Result<bool, Error> {
        let Some(path) = &self.file else { return Ok(false) };
        let keys = MeshKeys::from_file(path)?;
        if keys.fingerprint == self.keys.load().fingerprint {
            return Ok(false);
        }
        self.keys.store(Arc::new(keys));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn generated_keys_are_valid_and_differ() {
        let (a, b) = (generate_key_text().unwrap(), generate_key_text().unwrap());
        assert_eq!(a.len(), GENERATED_KEY_BYTES);
        assert_ne!(a, b);
        assert!(MeshKeys::parse(&a).is_ok());
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        let short = MeshKeys::parse("short").unwrap_err().to_string();
        assert!(short.contains("5 bytes long"), "{short}");
        let space = MeshKeys::parse(&format!("{A} x")).unwrap_err().to_string();
        assert!(space.contains("visible ASCII"), "{space}");
        assert!(MeshKeys::parse("").unwrap_err().to_string().contains("not 0"));
        assert!(MeshKeys::parse(&format!("{A}\n{B}\n{A}")).unwrap_err().to_string().contains("not 3"));
    }

    #[test]
    fn the_first_key_signs_and_every_key_verifies() {
        let old = MeshKeys::parse(A).unwrap();
        let rolling = MeshKeys::parse(&format!("{B}\n\n{A}\n")).unwrap();
        let new = MeshKeys::parse(B).unwrap();
        let parts: [&[u8]; 2] = [b"caller", b"svc"];
        let by_old = old.sign(&parts);
        let by_new = new.sign(&parts);
        assert!(rolling.verify(&parts, &by_old.as_ref()[..12]));
        assert!(rolling.verify(&parts, &by_new.as_ref()[..16]));
        assert!(!old.verify(&parts, &by_new.as_ref()[..12]));
        assert!(!new.verify(&[b"caller", b"svd"], &by_new.as_ref()[..12]));
        assert!(!new.verify(&[b"calle", b"rsvc"], &by_new.as_ref()[..12]), "parts are length-prefixed");
        assert!(!new.verify(&parts, &by_new.as_ref()[..8]), "too short a proof proves nothing");
    }

    #[test]
    fn a_key_file_is_reloaded_and_a_bad_one_keeps_the_keys_in_force() {
        let dir = std::env::temp_dir().join(format!("rootscale-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mesh-key");
        std::fs::write(&path, A).unwrap();
        let ring = KeyRing::from_file(&path).unwrap();
        assert!(!ring.reload().unwrap(), "unchanged");
        std::fs::write(&path, format!("{B}\n{A}\n")).unwrap();
        assert!(ring.reload().unwrap());
        assert_eq!(ring.current().key_count(), 2);
        std::fs::write(&path, "half-writ").unwrap();
        assert!(ring.reload().is_err());
        assert_eq!(ring.current().key_count(), 2, "the keys in force stay");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
