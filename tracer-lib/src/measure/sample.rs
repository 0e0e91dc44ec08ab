//! Sampling: with `ROOTSCALE_SAMPLE=1/N` a service measures one request in N, chosen at random, and the window
//! counts each measured request as N (docs/DESIGN.md §1.9).
//!
//! The choice is made once per request at the edge of the mesh and followed downstream: a request from an
//! instrumented caller that measured it is measured here too (its `rootscale-caller` says so), one its caller left
//! out is left out here too (`rootscale-caller: s=…;u=1;…`), and only a request from outside (no caller header, or one
//! whose proof does not verify) is drawn here. Every request a service measures, and every call it records, was thus
//! chosen with the same probability 1/N, as long as the mesh uses one rate: counts scaled by N are unbiased, and
//! percentiles come from the sample as they are. A left-out request costs a random draw and a task-local; its
//! calls carry the short caller header, never a timing header back.

use std::{fmt, str::FromStr};

/// The largest N of `1/N`: below one request in a thousand a window holds too few to decide on.
pub const MAX_SAMPLE_EVERY: u32 = 1024;

/// One request in `every` is measured (1: all of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleRate {
    every: u32,
}

impl SampleRate {
    /// Every request measured: the default.
    pub const ALL: SampleRate = SampleRate { every: 1 };

    /// One request in `every`; `None` unless 1 ≤ `every` ≤ [`MAX_SAMPLE_EVERY`].
    pub fn one_in(every: u32) -> Option<Self> {
        (1..=MAX_SAMPLE_EVERY).contains(&every).then_some(Self { every })
    }

    /// N of `1/N`: the weight of each measured request.
    pub fn every(self) -> u32 {
        self.every
    }

    /// Whether this is a sample rather than every request.
    pub fn is_sampling(self) -> bool {
        self.every > 1
    }

    /// Draws whether a request from outside the mesh is measured: true with probability 1/N.
    #[inline]
    pub(crate) fn draw(self) -> bool {
        self.every == 1 || fastrand::u32(..self.every) == 0
    }
}

impl Default for SampleRate {
    fn default() -> Self {
        Self::ALL
    }
}

impl fmt::Display for SampleRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "1/{}", self.every)
    }
}

/// Why a sampling rate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "expected 1/N with N a whole number from 1 to {MAX_SAMPLE_EVERY} (1/16: one request in 16), or 1 for every request"
)]
pub struct BadSampleRate;

impl FromStr for SampleRate {
    type Err = BadSampleRate;

    /// `1/N`, or `1`. No spaces, signs, leading zeros or fractions other than one over a whole number.
    fn from_str(text: &str) -> Result<Self, BadSampleRate> {
        let every = match text.strip_prefix("1/") {
            Some(every) => every,
            None if text == "1" => "1",
            None => return Err(BadSampleRate),
        };
        if every.is_empty() || every.len() > 4 || every.starts_with('0') || !every.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadSampleRate);
        }
        every.parse().ok().and_then(Self::one_in).ok_or(BadSampleRate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_strictly() {
        assert_eq!("1/16".parse(), Ok(SampleRate { every: 16 }));
        assert_eq!("1".parse(), Ok(SampleRate::ALL));
        assert_eq!("1/1".parse(), Ok(SampleRate::ALL));
        assert_eq!("1/1024".parse::<SampleRate>().map(SampleRate::every), Ok(1024));
        for bad in ["", "16", "1/", "1/0", "1/016", "1/1025", "2/16", " 1/16", "1/16 ", "1/+16", "0.0625", "1/1e3"] {
            assert_eq!(bad.parse::<SampleRate>(), Err(BadSampleRate), "{bad:?}");
        }
        assert_eq!(SampleRate::one_in(16).map(|rate| rate.to_string()).as_deref(), Some("1/16"));
    }

    #[test]
    fn a_draw_keeps_one_in_n() {
        let rate = SampleRate::one_in(16).unwrap();
        let draws = 160_000;
        let kept = (0..draws).filter(|_| rate.draw()).count();
        // Binomial: mean 10,000, standard deviation 97; ±6 standard deviations never fails by chance.
        assert!((9_420..=10_580).contains(&kept), "kept {kept} of {draws} at 1/16");
        assert!((0..1000).all(|_| SampleRate::ALL.draw()));
    }
}
