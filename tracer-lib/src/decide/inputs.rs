//! The decision's inputs for one closed window: the settings in force, the service's utilisation history (for
//! `saturated` and `idle`), what the neighbours said and the delegations received — assembled for
//! [`policy::decide`] and [`recommend`], which stay pure.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::{
    aggregate::WindowStats,
    decide::{
        Capacity, Decision, Delegated, PolicyConfig, PolicyInput, Recommendation, Slo, Verdict, policy, recommend,
        recommend::{Utilization, utilization_with},
    },
    exchange::neighbors::Neighbors,
};

/// Utilisation history kept (windows): as much as the verdicts look back at.
const MAX_HISTORY: usize = 8;
/// Windows in a row below the idle level before a replica says `idle`: one quiet window is noise. Waiting longer
/// is the operator's scale-down stabilisation, applied once, to the recommendations (docs/DESIGN.md §3).
const IDLE_WINDOWS: usize = 2;
/// A neighbour's report counts for this many windows after its own: reports for a window arrive after it closes.
const FRESH_WINDOWS: u64 = 2;

/// The settings the rule runs with: configured at start, then changed only by the authenticated operator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecisionSettings {
    pub slo: Option<Slo>,
    pub current_replicas: u32,
    pub target_utilization: f64,
}

impl DecisionSettings {
    /// The settings of an agent nobody has advised yet.
    pub fn configured(slo: Option<Slo>, policy: &PolicyConfig) -> Self {
        Self { slo, current_replicas: 1, target_utilization: policy.target_utilization }
    }

    /// These settings with `update`'s fields in place of theirs; an absent field keeps what is in force.
    pub fn with(self, update: &SettingsUpdate) -> Self {
        Self {
            slo: update.slo.or(self.slo),
            current_replicas: update.current_replicas.unwrap_or(self.current_replicas),
            target_utilization: update.target_utilization.unwrap_or(self.target_utilization),
        }
    }
}

/// What an `Advisor` question asks to use; `None` fields were left empty.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SettingsUpdate {
    pub slo: Option<Slo>,
    pub current_replicas: Option<u32>,
    pub target_utilization: Option<f64>,
}

/// The utilisation of recent windows and the verdicts they ended with, oldest first, bounded.
#[derive(Debug, Default)]
pub struct UtilizationHistory {
    windows: VecDeque<(u64, f64)>,
    verdicts: VecDeque<(u64, Verdict)>,
}

impl UtilizationHistory {
    pub fn push(&mut self, window_id: u64, load: f64) {
        self.windows.push_back((window_id, load));
        while self.windows.len() > MAX_HISTORY {
            self.windows.pop_front();
        }
    }

    /// The verdict `window_id` ended with (its last decision, once the next window closes).
    pub fn ended_with(&mut self, window_id: u64, verdict: Verdict) {
        self.verdicts.retain(|(id, _)| *id != window_id);
        self.verdicts.push_back((window_id, verdict));
        while self.verdicts.len() > MAX_HISTORY {
            self.verdicts.pop_front();
        }
    }

    /// Whether the window just before `window_id` already called for more replicas. A root cause named for one
    /// window only — a burst released upstream, a backlog draining — scales nothing (docs/DESIGN.md §1.5).
    fn pressed_before(&self, window_id: u64) -> bool {
        self.verdicts.iter().any(|(id, verdict)| {
            id.saturating_add(1) == window_id && matches!(verdict, Verdict::RootCause | Verdict::Saturated)
        })
    }

    /// One window's burst (a backlog released upstream, the noise of a short window) is not saturation: what
    /// counts is the lower of this window's utilisation and the one just before it (0 after a gap).
    fn sustained(&self, window_id: u64, load: f64) -> f64 {
        self.windows
            .iter()
            .rev()
            .find(|(id, _)| id.saturating_add(1) == window_id)
            .map_or(0.0, |(_, before)| before.min(load))
    }

    /// Whether the last `windows` windows all stayed below `below`.
    fn idle_throughout(&self, windows: usize, below: f64) -> bool {
        self.windows.len() >= windows && self.windows.iter().rev().take(windows).all(|(_, value)| *value < below)
    }
}

/// Each neighbour's subtree utilisation, from reports no older than [`FRESH_WINDOWS`] before `window_id`: a
/// pressure nobody has confirmed lately is not acted on.
pub fn subtree_utilization(neighbors: &Neighbors, window_id: u64) -> HashMap<String, f64> {
    let since = window_id.saturating_sub(FRESH_WINDOWS);
    neighbors.iter().filter_map(|(name, n)| n.subtree_utilization(since).map(|u| (name.clone(), u))).collect()
}

/// Everything the rule is run with for one window.
pub struct WindowInputs<'a> {
    pub service: &'a str,
    pub stats: &'a WindowStats,
    pub window_ms: u64,
    pub capacity: Capacity,
    /// The window's load (`utilization` of its stats with `capacity`).
    pub load: Utilization,
    pub policy: &'a PolicyConfig,
    pub settings: DecisionSettings,
    pub history: &'a UtilizationHistory,
    pub neighbors: &'a Neighbors,
    pub delegations: &'a [Delegated],
}

/// Runs the rule and the replica count on one window.
pub fn decide_window(inputs: &WindowInputs<'_>) -> (Decision, Recommendation) {
    let WindowInputs { service, stats, window_ms, capacity, load, policy, settings, history, neighbors, delegations } =
        *inputs;
    let target = settings.target_utilization;
    let stale: HashSet<String> = neighbors.iter().filter(|(_, n)| n.stale()).map(|(name, _)| name.clone()).collect();
    let neighbor_cpu: HashMap<String, f64> =
        neighbors.iter().filter_map(|(name, n)| n.cpu_utilization.map(|u| (name.clone(), u))).collect();
    let neighbor_subtree = subtree_utilization(neighbors, stats.window_id);
    let policy = PolicyConfig { target_utilization: target, ..policy.clone() };
    let input = PolicyInput {
        service,
        stats,
        window_ms,
        slo: settings.slo,
        delegations,
        stale_callees: &stale,
        neighbor_cpu: &neighbor_cpu,
        neighbor_subtree: &neighbor_subtree,
        pool_scope: capacity.pool_scope,
        pool_size: capacity.concurrency,
        cpu_utilization: load.cpu,
        utilization: history.sustained(stats.window_id, load.max()),
        idle_throughout: history.idle_throughout(IDLE_WINDOWS, policy.idle_fraction * target),
    };
    let decision = policy::decide(&input, &policy);
    let unserved = delegations.iter().map(|d| d.unserved_ratio).fold(1.0, f64::max);
    let load = if decision.verdict == Verdict::RootCause && unserved > 1.0 {
        // The callers' full pools held back part of the demand: it is this service's to serve.
        utilization_with(stats, window_ms, capacity, unserved)
    } else {
        load
    };
    let mut recommendation = recommend(decision.verdict, &load, settings.current_replicas, target, capacity);
    if decision.verdict == Verdict::RootCause && !history.pressed_before(stats.window_id) {
        // Named for the first time: hold (a usage ratio on target) until a second window says the same.
        recommendation.desired_replicas = settings.current_replicas.max(1);
        recommendation.usage_ratio = recommendation.usage_ratio.min(1.0);
        recommendation.reason =
            format!("root cause for one window; scaling waits for a second ({})", recommendation.reason);
    }
    (decision, recommendation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::recommend::utilization;

    #[test]
    fn an_empty_field_keeps_the_setting_in_force() {
        let configured =
            DecisionSettings::configured(Some(Slo { latency_us: 200_000, percentile: 95.0 }), &PolicyConfig::default());
        let kept = configured.with(&SettingsUpdate::default());
        assert_eq!(kept, configured);
        let changed = configured.with(&SettingsUpdate { current_replicas: Some(3), ..Default::default() });
        assert_eq!((changed.slo, changed.current_replicas), (configured.slo, 3));
    }

    #[test]
    fn a_gap_in_the_history_starts_sustained_utilisation_over() {
        let mut history = UtilizationHistory::default();
        history.push(10, 0.9);
        assert_eq!(history.sustained(11, 0.8), 0.8);
        assert_eq!(history.sustained(12, 0.8), 0.0);
        assert!(history.idle_throughout(1, 1.0));
        assert!(!history.idle_throughout(2, 1.0), "not enough windows yet");
    }

    /// As the agent does with each closed window of `service` (5 s long): the window joins the history, is
    /// decided, and what it ended with is remembered.
    fn close(
        service: &str,
        stats: &WindowStats,
        capacity: Capacity,
        settings: DecisionSettings,
        history: &mut UtilizationHistory,
    ) -> (Decision, Recommendation) {
        let (policy, neighbors) = (PolicyConfig::default(), Neighbors::new(8));
        let load = utilization(stats, 5_000, capacity);
        history.push(stats.window_id, load.max());
        let inputs = WindowInputs {
            service,
            stats,
            window_ms: 5_000,
            capacity,
            load,
            policy: &policy,
            settings,
            history,
            neighbors: &neighbors,
            delegations: &[],
        };
        let (decision, recommendation) = decide_window(&inputs);
        history.ended_with(stats.window_id, decision.verdict);
        (decision, recommendation)
    }

    #[test]
    fn idle_takes_two_quiet_windows_not_a_stabilisation_window() {
        use crate::aggregate::histogram::Histogram;
        let settings = DecisionSettings::configured(None, &PolicyConfig::default());
        let capacity = Capacity { cores: 4.0, concurrency: None, pool_scope: Default::default() };
        let mut history = UtilizationHistory::default();
        let mut verdicts = Vec::new();
        for window_id in 1..=4 {
            // 100 requests of 1 ms CPU in 5 s: 0.5 % of 4 cores, far below half the target.
            let mut stats = WindowStats::new(window_id);
            (stats.requests, stats.arrivals) = (100, 100);
            (stats.busy, stats.total) = (Histogram::repeated(1_000, 100), Histogram::repeated(1_200, 100));
            let (decision, recommendation) = close("quiet", &stats, capacity, settings, &mut history);
            verdicts.push(decision.verdict);
            assert!(recommendation.usage_ratio < 0.01, "{}", recommendation.usage_ratio);
        }
        // One quiet window is not enough; two are — the operator's stabilisation does the longer wait, once.
        assert_eq!(verdicts, [Verdict::Healthy, Verdict::Idle, Verdict::Idle, Verdict::Idle]);
    }

    #[test]
    fn a_root_cause_named_for_one_window_holds_and_a_second_window_scales() {
        use crate::aggregate::histogram::Histogram;
        let slo = Slo { latency_us: 100_000, percentile: 95.0 };
        let settings = DecisionSettings::configured(Some(slo), &PolicyConfig::default());
        let capacity = Capacity { cores: 4.0, concurrency: Some(2.0), pool_scope: Default::default() };
        let mut history = UtilizationHistory::default();
        // The entry waits 90 of its 100 ms in its own full pool of 2, with twice as many arrivals as completions.
        let window = |window_id: u64, slow: bool| {
            let mut stats = WindowStats::new(window_id);
            (stats.requests, stats.arrivals) = (100, if slow { 200 } else { 100 });
            let (total, local) = if slow { (100_000, 90_000) } else { (20_000, 10_000) };
            stats.total = Histogram::repeated(total, 100);
            stats.local_wait = Histogram::repeated(local, 100);
            stats.busy = Histogram::repeated(1_000, 100);
            stats
        };
        let mut outcomes = Vec::new();
        for (window_id, slow) in [(1, true), (2, true), (3, false), (4, true)] {
            let (decision, recommendation) = close("entry", &window(window_id, slow), capacity, settings, &mut history);
            outcomes.push((decision.verdict, recommendation.desired_replicas, recommendation.usage_ratio <= 1.0));
        }
        assert_eq!(
            outcomes,
            [
                (Verdict::RootCause, 1, true),
                (Verdict::RootCause, 3, false),
                (Verdict::Healthy, 1, true),
                (Verdict::RootCause, 1, true),
            ]
        );
    }
}
