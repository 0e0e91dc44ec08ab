//! Sampling: with `ROOTSCALE_SAMPLE=1/N` a service measures the first request from outside in each of
//! [`SAMPLE_RESERVOIR`] equal slices of every window (its reservoir) and one in N of the rest, chosen at random;
//! each measured request counts as 1/the probability it was chosen with — 1 from the reservoir, N from the draw
//! (docs/DESIGN.md §1.9).
//!
//! The choice is made once per request at the edge of the mesh and followed downstream: a request from an
//! instrumented caller that measured it is measured here too, with the weight its `rootscale-caller` carries
//! (`w=N`; none for 1), one its caller left out is left out here too (`rootscale-caller: s=…;u=1;…`), and only a
//! request from outside (no caller header, or one whose proof does not verify) is chosen here. Every measured
//! request and every recorded call thus carries the inverse of the probability it was measured with, whatever the
//! rates along its path: weighted counts are unbiased (Horvitz–Thompson), and percentiles come from the weighted
//! sample. The reservoir keeps a window from holding nothing when completions collapse — a slow service downstream
//! that lets a few requests a window finish — and measures a cold service in full. It is spread over the window
//! because what ends in a window arrived at any time before it. A left-out request costs a
//! random draw and a marker in the current-request slot; its calls carry the short caller header, never a timing header back.

use std::{
    fmt,
    str::FromStr,
    sync::atomic::{AtomicU64, Ordering},
};

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

    /// Chooses whether a request from outside the mesh, arriving in reservoir slice `slice` (see
    /// [`crate::aggregate::window::WindowClock::slice_at`]), is measured, and with what weight: `Some(1)` from the
    /// reservoir (or when not sampling), `Some(N)` drawn with probability 1/N, `None` left out.
    #[inline]
    pub(crate) fn choose(self, reservoir: &Reservoir, slice: u64) -> Option<u32> {
        if self.every == 1 || reservoir.take(slice) {
            Some(1)
        } else {
            (fastrand::u32(..self.every) == 0).then_some(self.every)
        }
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

/// Requests from outside measured in full per window, before the rate applies: the first of each of this many
/// equal slices of the window.
pub const SAMPLE_RESERVOIR: u32 = 16;

/// The last reservoir slice a request was taken in.
#[derive(Debug, Default)]
pub(crate) struct Reservoir {
    taken_in: AtomicU64,
}

impl Reservoir {
    /// Takes `slice`'s place, if no request has yet: one compare-and-swap once a slice, and one load of a line that
    /// stays shared otherwise. A lost race counts as a taken place: the request is drawn instead, and weighed as
    /// drawn, so the estimate stays unbiased.
    #[inline]
    fn take(&self, slice: u64) -> bool {
        let taken_in = self.taken_in.load(Ordering::Relaxed);
        slice > taken_in
            && self.taken_in.compare_exchange(taken_in, slice, Ordering::Relaxed, Ordering::Relaxed).is_ok()
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
    fn past_the_reservoir_a_draw_keeps_one_in_n_weighed_n() {
        let rate = SampleRate::one_in(16).unwrap();
        let reservoir = Reservoir::default();
        let draws = 160_000;
        let chosen: Vec<Option<u32>> = (0..draws).map(|_| rate.choose(&reservoir, 7)).collect();
        // The slice's first from the reservoir, at weight 1; then one in 16, at weight 16.
        assert_eq!(chosen[0], Some(1));
        let rest = &chosen[1..];
        assert!(rest.iter().all(|weight| matches!(weight, None | Some(16))));
        let kept = rest.iter().flatten().count();
        // Binomial: mean 9,999.9, standard deviation 97; ±6 standard deviations never fails by chance.
        assert!((9_420..=10_580).contains(&kept), "kept {kept} of {} at 1/16", rest.len());
        // Each later slice takes its first; a late request of an earlier slice is drawn.
        for slice in 8..8 + u64::from(SAMPLE_RESERVOIR) {
            assert_eq!(rate.choose(&reservoir, slice), Some(1), "slice {slice}");
        }
        let late: Vec<Option<u32>> = (0..1000).map(|_| rate.choose(&reservoir, 7)).collect();
        assert!(late.iter().all(|weight| matches!(weight, None | Some(16))));
        assert!((0..1000).all(|_| SampleRate::ALL.choose(&reservoir, 9) == Some(1)));
    }
}
