//! Window ids: `unix_time_ms / window_ms`, so every service with the same window length agrees on where windows
//! start without talking to the others. Read from monotonic clocks anchored once to the wall clock, so the request
//! path pays for no clock read it did not already need: the standard one for the window closer and the agent, and
//! the request path's own ([`crate::measure::clock`]) for the window a request or call ends in.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::measure::clock;

/// Maps instants to window ids.
#[derive(Clone, Debug)]
pub struct WindowClock {
    window_ms: u64,
    anchor: Instant,
    /// The request path's clock at `anchor` (see [`paired_now`]).
    counter_anchor: clock::Instant,
    anchor_unix_ms: u64,
}

/// Milliseconds in `since`, without the 128-bit arithmetic of `Duration::as_millis`: this runs on every request.
fn millis(since: Duration) -> u64 {
    since.as_secs().saturating_mul(1000).saturating_add(u64::from(since.subsec_millis()))
}

/// Reads of the two clocks this far apart are taken as one instant.
const PAIRED_READ_GAP: Duration = Duration::from_micros(20);
/// Tries at a pair of reads within [`PAIRED_READ_GAP`] before the closest one is kept.
const PAIRED_READ_TRIES: usize = 16;

/// The monotonic clock and the request path's counter read at one instant: the counter read on both sides of the
/// monotonic read, its midpoint kept. A thread preempted between two plain reads (milliseconds, on a loaded
/// machine) would shift every request's window against the closer's by that much, so the closest of a few tries
/// is kept.
fn paired_now() -> (Instant, clock::Instant) {
    let read = || {
        let before = clock::now();
        let anchor = Instant::now();
        let gap = clock::now().saturating_duration_since(before);
        (gap, anchor, before + gap / 2)
    };
    let mut closest = read();
    for _ in 1..PAIRED_READ_TRIES {
        if closest.0 <= PAIRED_READ_GAP {
            break;
        }
        let next = read();
        if next.0 < closest.0 {
            closest = next;
        }
    }
    (closest.1, closest.2)
}

impl WindowClock {
    pub fn new(window: Duration) -> Self {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let anchor_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let (anchor, counter_anchor) = paired_now();
        Self { window_ms, anchor, counter_anchor, anchor_unix_ms }
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    pub fn unix_ms(&self, at: Instant) -> u64 {
        self.anchor_unix_ms.saturating_add(millis(at.saturating_duration_since(self.anchor)))
    }

    /// The window `at` falls in.
    #[inline]
    pub fn window_id(&self, at: Instant) -> u64 {
        self.unix_ms(at) / self.window_ms
    }

    /// The window `at`, read from the request path's clock, falls in.
    #[inline]
    pub fn window_at(&self, at: clock::Instant) -> u64 {
        self.anchor_unix_ms.saturating_add(millis(at.saturating_duration_since(self.counter_anchor))) / self.window_ms
    }

    /// Which of the `slices_per_window` equal slices of its window `at` falls in, numbered on from the epoch like
    /// window ids (slice `k` lies in window `k / slices_per_window`).
    #[inline]
    pub fn slice_at(&self, at: clock::Instant, slices_per_window: u64) -> u64 {
        let unix_ms = self.anchor_unix_ms.saturating_add(millis(at.saturating_duration_since(self.counter_anchor)));
        unix_ms.saturating_mul(slices_per_window) / self.window_ms
    }

    /// The instant window `window_id` ends (the next one starts); `None` if that is beyond what `Instant` holds.
    pub fn window_end(&self, window_id: u64) -> Option<Instant> {
        let end_unix_ms = window_id.saturating_add(1).saturating_mul(self.window_ms);
        self.anchor.checked_add(Duration::from_millis(end_unix_ms.saturating_sub(self.anchor_unix_ms)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_to_wall_clock_multiples() {
        let clock = WindowClock::new(Duration::from_millis(5000));
        let now = Instant::now();
        let id = clock.window_id(now);
        let end = clock.window_end(id).unwrap();
        assert!(end > now && end <= now + Duration::from_millis(5000));
        assert_eq!(clock.window_id(end), id + 1);
        assert_eq!(clock.unix_ms(end) % 5000, 0);
        // Absurd ids saturate instead of overflowing.
        let _ = clock.window_end(u64::MAX);
        // The request path's clock puts an instant in the same window (but within a millisecond of its edge).
        let (std_now, counter_now) = (Instant::now(), crate::measure::clock::now());
        let into_window_ms = clock.unix_ms(std_now) % 5000;
        if (1..4999).contains(&into_window_ms) {
            assert_eq!(clock.window_at(counter_now), clock.window_id(std_now));
        }
    }
}
