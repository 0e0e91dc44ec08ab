//! An engine's memory handed to a successor: a new leader (or a restarted operator) would otherwise forget the
//! recent recommendations and scale events, and with them stabilisation and rate limits. The controller keeps it
//! in the `ScalingDecision`'s status and restores it when it has no engine of its own for a Deployment.
//!
//! Times are the wall clock's Unix seconds, the one clock two instances share. Only what the rules read is kept:
//! of each run of equal recommendations the last (stabilisation asks when a count was last recommended), the
//! first of the current run (it is recommended again at the next decision anyway), and the scale events within
//! the longest policy period — so the memory changes when the recommendation or the replicas do, not every resync.

use std::time::{Duration, Instant};

use crate::engine::decide::{Engine, SCALE_EVENTS_KEPT, Stamped};

/// Entries kept per list; older ones are dropped first.
pub const MAX_REMEMBERED: usize = 32;
/// Largest count taken from a stored memory.
const MAX_REMEMBERED_VALUE: u32 = 100_000;
/// Recommendations older than this are of no use to any stabilisation window (HPA's limit is an hour).
const RECOMMENDATIONS_KEPT: Duration = Duration::from_secs(3600);

/// A remembered count at a Unix second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Remembered {
    pub unix: u64,
    pub value: u32,
}

/// What an engine remembers, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    pub recommendations: Vec<Remembered>,
    /// Replicas added by each scale-up.
    pub scale_ups: Vec<Remembered>,
    /// Replicas removed by each scale-down.
    pub scale_downs: Vec<Remembered>,
}

fn remembered(entries: impl Iterator<Item = Stamped>) -> Vec<Remembered> {
    let all: Vec<Remembered> = entries.map(|entry| Remembered { unix: entry.unix, value: entry.value }).collect();
    all[all.len().saturating_sub(MAX_REMEMBERED)..].to_vec()
}

impl Engine {
    /// What a successor needs of this engine's memory.
    pub fn memory(&self) -> Memory {
        let recommendations = &self.recommendations;
        // The last of each run of equal values, and the first of the current run.
        let current_run_start = recommendations
            .iter()
            .rposition(|entry| Some(entry.value) != recommendations.last().map(|last| last.value))
            .map_or(0, |before| before + 1);
        let kept = recommendations.iter().enumerate().filter(|(index, entry)| {
            let ends_a_run = recommendations.get(index + 1).is_some_and(|next| next.value != entry.value);
            ends_a_run || *index == current_run_start
        });
        Memory {
            recommendations: remembered(kept.map(|(_, entry)| *entry)),
            scale_ups: remembered(self.scale_ups.iter().copied()),
            scale_downs: remembered(self.scale_downs.iter().copied()),
        }
    }

    /// An engine that remembers `memory`, read at `now` (the engine's clock) and `now_unix` (the wall clock).
    /// Entries from the future (another clock ahead of this one) count as now; entries too old to matter, or
    /// beyond what this clock can go back to, are dropped; values are bounded.
    ///
    /// Both stamps are whole seconds, so an entry's true age is anywhere in `(n - s - 1, n - s + 1)`. It is read
    /// as the youngest of those, `n - s - 1`: a successor then holds a rate limit or a stabilisation window up to
    /// two seconds longer than its predecessor would have, never shorter (read as `n - s`, a scale-up 14.1 s old
    /// could look 15 s old and leave the period early, letting the successor double the replicas a second time).
    pub fn restored(memory: &Memory, now: Instant, now_unix: u64) -> Self {
        let restore = |entries: &[Remembered], keep: Duration| -> Vec<Stamped> {
            let mut restored: Vec<Stamped> = entries
                .iter()
                .rev()
                .take(MAX_REMEMBERED)
                .filter_map(|entry| {
                    let age = Duration::from_secs(now_unix.saturating_sub(entry.unix).saturating_sub(1));
                    (age <= keep).then_some(())?;
                    let at = now.checked_sub(age)?;
                    Some(Stamped { at, unix: entry.unix.min(now_unix), value: entry.value.min(MAX_REMEMBERED_VALUE) })
                })
                .collect();
            // Stamps a second apart can both restore as now: the stamp keeps them oldest first.
            restored.sort_by_key(|entry| (entry.at, entry.unix));
            restored
        };
        Engine {
            recommendations: restore(&memory.recommendations, RECOMMENDATIONS_KEPT),
            scale_ups: restore(&memory.scale_ups, SCALE_EVENTS_KEPT),
            scale_downs: restore(&memory.scale_downs, SCALE_EVENTS_KEPT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{
        Pods, TargetConfig,
        combine::{Advice, Verdict},
    };

    fn all(verdict: Verdict, ratio: f64, replicas: usize) -> Vec<Option<Advice>> {
        vec![Some(Advice { verdict, usage_ratio: ratio }); replicas]
    }

    fn config() -> TargetConfig {
        TargetConfig { max_replicas: 100, ..TargetConfig::default() }
    }

    fn unix_now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn a_successor_keeps_the_rate_limit_of_the_period() {
        let now = Instant::now();
        let mut leader = Engine::new();
        // From 2 at 10x: HPA's default allows max(+4, +100 %) = 6 in the first 15 s.
        let ready = all(Verdict::RootCause, 10.0, 2);
        assert_eq!(leader.decide(now, &config(), 2, Pods { ready: &ready, unready: 0 }).desired, 6);
        leader.record_scale(now, 2, 6);
        let memory = leader.memory();
        assert_eq!(memory.scale_ups.iter().map(|e| e.value).collect::<Vec<_>>(), [4]);
        // Five seconds later a successor takes over. Restored, it still counts the +4 in the period: no more.
        let later = now + Duration::from_secs(5);
        let hot = all(Verdict::RootCause, 10.0, 6);
        let mut successor = Engine::restored(&memory, later, unix_now() + 5);
        assert_eq!(successor.decide(later, &config(), 6, Pods { ready: &hot, unready: 0 }).desired, 6);
        // Forgetting, it would have doubled again at once.
        assert_eq!(Engine::new().decide(later, &config(), 6, Pods { ready: &hot, unready: 0 }).desired, 12);
    }

    /// The stamps are whole seconds. A scale-up made just before a second ticked over and read just after the
    /// period's last whole second has ticked shows 15 s between its stamps, though only a little over 14 s
    /// passed: the successor must still count it.
    #[test]
    fn a_successor_counts_a_scale_up_whose_stamps_round_up_to_the_period() {
        let now = Instant::now();
        let now_unix = unix_now();
        let period = Duration::from_secs(15);
        // Made 14.1 s ago, stamped 15 whole seconds before now's stamp.
        let memory = Memory {
            recommendations: vec![],
            scale_ups: vec![Remembered { unix: now_unix - period.as_secs(), value: 4 }],
            scale_downs: vec![],
        };
        let hot = all(Verdict::RootCause, 10.0, 5);
        let mut successor = Engine::restored(&memory, now, now_unix);
        // From 1 (5 now, 4 added in the period): max(1 + 4, 1 × 2) = 5, so no more.
        assert_eq!(successor.decide(now, &config(), 5, Pods { ready: &hot, unready: 0 }).desired, 5);
        // A second later the scale-up has certainly left the period: from 5, +100 % → 10.
        let later = now + Duration::from_secs(1);
        assert_eq!(successor.decide(later, &config(), 5, Pods { ready: &hot, unready: 0 }).desired, 10);
    }

    #[test]
    fn runs_of_equal_recommendations_keep_their_ends_only() {
        let start = Instant::now();
        let mut engine = Engine::new();
        let ready = |ratio| all(Verdict::RootCause, ratio, 2);
        let config = TargetConfig { max_replicas: 100, tolerance: 0.0, ..TargetConfig::default() };
        for (second, ratio) in [(0, 3.0), (1, 3.0), (2, 3.0), (3, 4.0), (4, 4.0), (5, 4.0)] {
            engine.decide(start + Duration::from_secs(second), &config, 2, Pods { ready: &ready(ratio), unready: 0 });
        }
        let memory = engine.memory();
        // The last 6 (second 2) and the first 8 (second 3).
        assert_eq!(memory.recommendations.iter().map(|e| e.value).collect::<Vec<_>>(), [6, 8]);
        // Deciding 8 again changes nothing a successor needs: the memory is the same.
        engine.decide(start + Duration::from_secs(6), &config, 2, Pods { ready: &ready(4.0), unready: 0 });
        assert_eq!(engine.memory(), memory);
    }

    #[test]
    fn a_stored_memory_is_bounded() {
        let now_unix = unix_now();
        let entry = |ago: u64, value| Remembered { unix: now_unix.saturating_sub(ago), value };
        let memory = Memory {
            recommendations: (0..1000)
                .map(|i| entry(1, i))
                .chain([entry(7200, 9), Remembered { unix: now_unix + 600, value: u32::MAX }])
                .collect(),
            scale_ups: vec![entry(3600, 4), entry(10, 4)],
            scale_downs: vec![],
        };
        let engine = Engine::restored(&memory, Instant::now(), now_unix);
        // The newest MAX_REMEMBERED are read; of those the one two hours old is dropped.
        assert_eq!(engine.recommendations.len(), MAX_REMEMBERED - 1);
        assert!(engine.recommendations.iter().all(|e| e.value <= MAX_REMEMBERED_VALUE && e.unix <= now_unix));
        assert_eq!(engine.scale_ups.len(), 1, "an event older than the longest period is of no use");
    }
}
