//! A mergeable latency histogram on log-linear buckets (the HdrHistogram / DDSketch family): values below 16 µs are
//! exact; above that every power of two is split into 16 equal buckets. A quantile read from it is the midpoint of
//! its bucket, so it is within 1/32 (3.2 %) of the true value. Memory is bounded: at most [`BUCKETS`] counters,
//! grown only as far as the largest value seen, and values above ~71 minutes share the top bucket.
//!
//! Hand-written rather than a crate because the window shards record into it under their own lock on the request
//! path: it must be a few adds, never allocate after warm-up, and encode sparsely into a [`proto::Histogram`].

use rootscale_proto::v1 as proto;

/// Log2 of the buckets per power of two.
pub const SUB_BUCKET_BITS: u32 = 4;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
/// Largest exponent kept; values of 2^MAX_EXPONENT µs and more land in the last bucket.
const MAX_EXPONENT: u32 = 32;
/// Number of buckets in the full range.
pub const BUCKETS: usize = (SUB_BUCKETS + (MAX_EXPONENT - SUB_BUCKET_BITS) as u64 * SUB_BUCKETS) as usize;

/// Bucket index of a value in microseconds.
#[inline]
pub fn bucket_index(value_us: u64) -> usize {
    if value_us < SUB_BUCKETS {
        return value_us as usize;
    }
    let exponent = 63 - value_us.leading_zeros(); // value in [2^exponent, 2^(exponent+1))
    if exponent >= MAX_EXPONENT {
        return BUCKETS - 1;
    }
    let shift = exponent - SUB_BUCKET_BITS;
    let sub = (value_us >> shift) - SUB_BUCKETS; // 0..SUB_BUCKETS
    (SUB_BUCKETS + u64::from(shift) * SUB_BUCKETS + sub) as usize
}

/// The smallest value and the width of a bucket.
fn bucket_bounds(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < SUB_BUCKETS {
        return (index, 1);
    }
    let shift = (index - SUB_BUCKETS) / SUB_BUCKETS;
    let sub = (index - SUB_BUCKETS) % SUB_BUCKETS;
    ((SUB_BUCKETS + sub) << shift, 1 << shift)
}

/// The value a bucket stands for: its midpoint (its exact value for the first 16).
pub fn bucket_value(index: usize) -> u64 {
    let (low, width) = bucket_bounds(index);
    low + width / 2
}

/// A latency distribution in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum_us: u64,
    max_us: u64,
}

impl Histogram {
    pub fn new() -> Self {
        Self::default()
    }

    /// `count` values of `value_us`: a window's distribution in a test.
    #[cfg(test)]
    pub(crate) fn repeated(value_us: u64, count: u64) -> Self {
        let mut histogram = Self::new();
        for _ in 0..count {
            histogram.record(value_us);
        }
        histogram
    }

    /// Records one value.
    #[inline]
    pub fn record(&mut self, value_us: u64) {
        self.record_weighted(value_us, 1);
    }

    /// Records one value of a sample that stands for `weight` values (a request measured with probability
    /// 1/`weight`): counted `weight` times, its maximum once.
    #[inline]
    pub fn record_weighted(&mut self, value_us: u64, weight: u64) {
        let index = bucket_index(value_us);
        if index >= self.counts.len() {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] = self.counts[index].saturating_add(weight);
        self.count = self.count.saturating_add(weight);
        self.sum_us = self.sum_us.saturating_add(value_us.saturating_mul(weight));
        self.max_us = self.max_us.max(value_us);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        if other.counts.len() > self.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        // Saturating: a peer's histogram may carry absurd counts; they must not wrap or panic.
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
        self.count = self.count.saturating_add(other.count);
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self.max_us = self.max_us.max(other.max_us);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }

    pub fn max_us(&self) -> u64 {
        self.max_us
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn mean_us(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.sum_us as f64 / self.count as f64 }
    }

    /// The value at `percentile` (0–100): the smallest bucket with at least that share of values at or below it,
    /// capped at the exact maximum. `None` when empty.
    pub fn percentile_us(&self, percentile: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let percentile = if percentile.is_nan() { 100.0 } else { percentile.clamp(0.0, 100.0) };
        let rank = ((percentile / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(bucket_value(index).min(self.max_us));
            }
        }
        Some(self.max_us)
    }

    /// Sparse wire form.
    pub fn to_proto(&self) -> proto::Histogram {
        let mut bucket_index_delta = Vec::new();
        let mut bucket_count = Vec::new();
        let mut previous = 0usize;
        for (index, &count) in self.counts.iter().enumerate() {
            if count > 0 {
                bucket_index_delta.push((index - previous) as u32);
                bucket_count.push(count);
                previous = index;
            }
        }
        proto::Histogram {
            sub_bucket_bits: SUB_BUCKET_BITS,
            count: self.count,
            sum_us: self.sum_us,
            max_us: self.max_us,
            bucket_index_delta,
            bucket_count,
        }
    }

    /// Reads the wire form, checking everything a peer could get wrong.
    pub fn from_proto(wire: &proto::Histogram) -> Result<Self, HistogramError> {
        if wire.sub_bucket_bits != SUB_BUCKET_BITS {
            return Err(HistogramError::Scheme(wire.sub_bucket_bits));
        }
        if wire.bucket_index_delta.len() != wire.bucket_count.len() {
            return Err(HistogramError::Shape);
        }
        let mut histogram = Histogram::new();
        let mut index = 0usize;
        for (position, (&delta, &count)) in wire.bucket_index_delta.iter().zip(&wire.bucket_count).enumerate() {
            if position > 0 && delta == 0 {
                return Err(HistogramError::Shape);
            }
            index = index.checked_add(delta as usize).filter(|&i| i < BUCKETS).ok_or(HistogramError::Range)?;
            if count == 0 {
                return Err(HistogramError::Shape);
            }
            if index >= histogram.counts.len() {
                histogram.counts.resize(index + 1, 0);
            }
            histogram.counts[index] = count;
            histogram.count = histogram.count.checked_add(count).ok_or(HistogramError::Range)?;
        }
        if histogram.count != wire.count {
            return Err(HistogramError::Count);
        }
        histogram.sum_us = wire.sum_us;
        histogram.max_us = wire.max_us;
        // The maximum must fall in the last non-empty bucket (the top bucket is open-ended).
        if let Some(last) = histogram.counts.len().checked_sub(1) {
            let (low, width) = bucket_bounds(last);
            if wire.max_us < low || (last < BUCKETS - 1 && wire.max_us >= low + width) {
                return Err(HistogramError::Range);
            }
        } else if wire.max_us != 0 || wire.sum_us != 0 {
            return Err(HistogramError::Count);
        }
        Ok(histogram)
    }
}

/// Why a peer's histogram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistogramError {
    #[error("histogram uses bucket scheme {0}, this build reads only {SUB_BUCKET_BITS}")]
    Scheme(u32),
    #[error("histogram buckets are malformed (lengths differ, repeat an index or hold zero counts)")]
    Shape,
    #[error("histogram bucket index or count out of range")]
    Range,
    #[error("histogram count does not equal the sum of its buckets")]
    Count,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_a_bucket_that_contains_it() {
        let mut value = 0u64;
        while value < (1 << 34) {
            let index = bucket_index(value);
            assert!(index < BUCKETS);
            let (low, width) = bucket_bounds(index);
            if value < (1 << MAX_EXPONENT) {
                assert!(low <= value && value < low + width, "{value} not in bucket {index} [{low}, +{width})");
                let mid = bucket_value(index) as f64;
                let error = (mid - value as f64).abs() / (value.max(1) as f64);
                assert!(error <= 1.0 / 32.0 + 1e-9, "relative error {error} at {value}");
            } else {
                assert_eq!(index, BUCKETS - 1);
            }
            value = value + 1 + value / 7;
        }
    }

    #[test]
    fn percentiles_merge_and_round_trip() {
        let mut low = Histogram::new();
        let mut high = Histogram::new();
        for v in 1..=900 {
            low.record(v * 100);
        }
        for v in 901..=1000 {
            high.record(v * 100);
        }
        let mut all = low.clone();
        all.merge(&high);
        assert_eq!(all.count(), 1000);
        assert_eq!(all.max_us(), 100_000);
        let p95 = all.percentile_us(95.0).unwrap() as f64;
        assert!((p95 - 95_000.0).abs() / 95_000.0 < 0.035, "p95 {p95}");
        let p50 = all.percentile_us(50.0).unwrap() as f64;
        assert!((p50 - 50_000.0).abs() / 50_000.0 < 0.035, "p50 {p50}");
        assert_eq!(all.percentile_us(100.0), Some(100_000));
        let back = Histogram::from_proto(&all.to_proto()).unwrap();
        assert_eq!(back, all);
        assert_eq!(Histogram::new().percentile_us(50.0), None);
    }

    #[test]
    fn malformed_wire_histograms_are_refused() {
        let mut good = Histogram::new();
        good.record(10);
        good.record(1000);
        let wire = good.to_proto();
        let mut bad = wire.clone();
        bad.sub_bucket_bits = 7;
        assert_eq!(Histogram::from_proto(&bad), Err(HistogramError::Scheme(7)));
        let mut bad = wire.clone();
        bad.count += 1;
        assert_eq!(Histogram::from_proto(&bad), Err(HistogramError::Count));
        let mut bad = wire.clone();
        bad.bucket_index_delta[1] = u32::MAX;
        assert_eq!(Histogram::from_proto(&bad), Err(HistogramError::Range));
        let mut bad = wire.clone();
        bad.bucket_count.pop();
        assert_eq!(Histogram::from_proto(&bad), Err(HistogramError::Shape));
        let mut bad = wire.clone();
        bad.bucket_count[0] = u64::MAX;
        assert!(Histogram::from_proto(&bad).is_err());
        let mut bad = wire.clone();
        bad.max_us = 5_000; // beyond the last non-empty bucket (the one holding 1000)
        assert_eq!(Histogram::from_proto(&bad), Err(HistogramError::Range));
        let mut bad = wire;
        bad.max_us = 500; // below it
        assert_eq!(Histogram::from_proto(&bad), Err(HistogramError::Range));
        let empty_with_sum = proto::Histogram { sub_bucket_bits: SUB_BUCKET_BITS, sum_us: 9, ..Default::default() };
        assert_eq!(Histogram::from_proto(&empty_with_sum), Err(HistogramError::Count));
        // Absurd but well-formed peer counts saturate instead of wrapping when merged.
        let mut huge = Histogram::new();
        huge.record(7);
        let mut wire = huge.to_proto();
        wire.bucket_count[0] = u64::MAX;
        wire.count = u64::MAX;
        let huge = Histogram::from_proto(&wire).unwrap();
        let mut sum = huge.clone();
        sum.merge(&huge);
        assert_eq!(sum.count(), u64::MAX);
        assert_eq!(sum.percentile_us(50.0), Some(7));
    }
}
