//! The decision's inputs for one closed window: the settings in force, the service's utilisation history (for
//! `saturated` and `idle`), what the neighbours said and the delegations received — assembled for
//! [`policy::decide`] and [`recommend`], which stay pure.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::{
    aggregate::WindowStats,
    decide::{
        Capacity, Decision, Delegated, PolicyConfig, PolicyInput, Recommendation, Slo, policy, recommend,
        recommend::utilization,
    },
    exchange::neighbors::Neighbors,
};

/// Utilisation history kept (windows): as much as the verdicts look back at.
const MAX_HISTORY: usize = 8;
/// Windows in a row below the idle level before a replica says `idle`: one quiet window is noise. Waiting longer
/// is the operator's scale-down stabilisation, applied once, to the recommendations (docs/DESIGN.md §3).
const IDLE_WINDOWS: usize = 2;

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

/// The utilisation of recent windows, oldest first, bounded.
#[derive(Debug, Default)]
pub struct UtilizationHistory {
    windows: VecDeque<(u64, f64)>,
}

impl UtilizationHistory {
    pub fn push(&mut self, window_id: u64, load: f64) {
        self.windows.push_back((window_id, load));
        while self.windows.len() > MAX_HISTORY {
            self.windows.pop_front();
        }
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

/// Everything the rule is run with for one window.
pub struct WindowInputs<'a> {
    pub service: &'a str,
    pub stats: &'a WindowStats,
    pub window_ms: u64,
    pub capacity: Capacity,
    pub policy: &'a PolicyConfig,
    pub settings: DecisionSettings,
    pub history: &'a UtilizationHistory,
    pub neighbors: &'a Neighbors,
    pub delegations: &'a [Delegated],
}

/// Runs the rule and the replica count on one window.
pub fn decide_window(inputs: &WindowInputs<'_>) -> (Decision, Recommendation) {
    let WindowInputs { service, stats, window_ms, capacity, policy, settings, history, neighbors, delegations } =
        *inputs;
    let load = utilization(stats, window_ms, capacity);
    let target = settings.target_utilization;
    let stale: HashSet<String> = neighbors.iter().filter(|(_, n)| n.stale()).map(|(name, _)| name.clone()).collect();
    let neighbor_cpu: HashMap<String, f64> =
        neighbors.iter().filter_map(|(name, n)| n.cpu_utilization.map(|u| (name.clone(), u))).collect();
    let policy = PolicyConfig { target_utilization: target, ..policy.clone() };
    let input = PolicyInput {
        service,
        stats,
        window_ms,
        slo: settings.slo,
        delegations,
        stale_callees: &stale,
        neighbor_cpu: &neighbor_cpu,
        cpu_utilization: load.cpu,
        utilization: history.sustained(stats.window_id, load.max()),
        idle_throughout: history.idle_throughout(IDLE_WINDOWS, policy.idle_fraction * target),
    };
    let decision = policy::decide(&input, &policy);
    let recommendation = recommend(decision.verdict, stats, window_ms, settings.current_replicas, target, capacity);
    (decision, recommendation)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn idle_takes_two_quiet_windows_not_a_stabilisation_window() {
        use crate::{aggregate::histogram::Histogram, decide::Verdict};
        let policy = PolicyConfig::default();
        let settings = DecisionSettings::configured(None, &policy);
        let neighbors = Neighbors::new(8);
        let capacity = Capacity { cores: 4.0, concurrency: None };
        let mut history = UtilizationHistory::default();
        let mut verdicts = Vec::new();
        for window_id in 1..=4 {
            // 100 requests of 1 ms CPU in 5 s: 0.5 % of 4 cores, far below half the target.
            let mut stats = WindowStats::new(window_id);
            (stats.requests, stats.arrivals) = (100, 100);
            let (mut busy, mut total) = (Histogram::new(), Histogram::new());
            for _ in 0..100 {
                busy.record(1_000);
                total.record(1_200);
            }
            (stats.busy, stats.total) = (busy, total);
            // As the agent does: the window joins the history, then is decided.
            history.push(window_id, utilization(&stats, 5_000, capacity).max());
            let inputs = WindowInputs {
                service: "quiet",
                stats: &stats,
                window_ms: 5_000,
                capacity,
                policy: &policy,
                settings,
                history: &history,
                neighbors: &neighbors,
                delegations: &[],
            };
            let (decision, recommendation) = decide_window(&inputs);
            verdicts.push(decision.verdict);
            assert!(recommendation.usage_ratio < 0.01, "{}", recommendation.usage_ratio);
        }
        // One quiet window is not enough; two are — the operator's stabilisation does the longer wait, once.
        assert_eq!(verdicts, [Verdict::Healthy, Verdict::Idle, Verdict::Idle, Verdict::Idle]);
    }
}
