//! The request path's clock: the CPU's time-stamp counter, read through `quanta` and scaled to the monotonic clock
//! it was calibrated against, where quanta finds the counter invariant; the monotonic clock itself otherwise.
//!
//! A request reads the clock five to seven times (its start, each poll's start and end, its end) and each call
//! twice or three times, so a few nanoseconds a read matter. The calibration (up to ~200 ms, once per process) is
//! done when the first tracer is built, not on the first request. The window a request ends in is read from the same
//! clock ([`crate::aggregate::WindowClock::window_at`]), anchored beside the monotonic clock the window closer uses.

use std::sync::OnceLock;

pub use quanta::Instant;

static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();

fn clock() -> &'static quanta::Clock {
    CLOCK.get_or_init(quanta::Clock::new)
}

/// Now.
#[inline]
pub fn now() -> Instant {
    clock().now()
}

/// Calibrates the clock now, so that no request waits for it.
pub fn calibrate() {
    let _ = clock();
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_counter_keeps_time_with_the_monotonic_clock() {
        calibrate();
        for sleep_ms in [5u64, 20, 50] {
            let (tsc, mono) = (now(), std::time::Instant::now());
            std::thread::sleep(Duration::from_millis(sleep_ms));
            let (tsc, mono) = (now().saturating_duration_since(tsc), mono.elapsed());
            let drift = tsc.abs_diff(mono);
            // Both read around the same sleep: they may differ by the few microseconds between the two reads.
            assert!(drift < Duration::from_micros(200), "{sleep_ms} ms: counter {tsc:?}, monotonic {mono:?}");
            assert!(tsc >= Duration::from_millis(sleep_ms), "a sleep of {sleep_ms} ms read as {tsc:?}");
        }
    }
}
