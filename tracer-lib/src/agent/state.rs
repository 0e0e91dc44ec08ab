//! The agent's state and its per-window work: on each closed window, learn the neighbours, decide, and send
//! reports; on each received report, note the neighbour and, for a delegation, decide again and pass it on.
//!
//! One mutex guards the state; it is taken by the window task, the gRPC handlers and the operator's calls, never
//! by the request path, and never held across an `.await`.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use rootscale_proto::v1 as proto;
use tokio::sync::watch;

use crate::{
    ClosedWindow, Tracer,
    agent::{config::AgentBuilder, metrics::AgentMetrics},
    aggregate::WindowStats,
    decide::{
        Capacity, Decision, Delegated, PolicyConfig, PolicyInput, Recommendation, Slo, decide, recommend,
        recommend::utilization,
    },
    exchange::{
        neighbors::{EXPIRE_AFTER, Neighbors},
        report::{self, ReportHead, ValidReport},
        sender::Sender,
    },
};

/// What the agent knows, as the `Advisor.Snapshot` call returns it.
pub type AgentSnapshot = proto::SnapshotResponse;

/// Delegations kept per window, and windows kept.
const MAX_DELEGATIONS: usize = 64;
const DELEGATION_WINDOWS: u64 = 3;
/// Utilisation history kept (windows), enough for an hour of 5 s windows.
const MAX_HISTORY: usize = 720;

/// What the operator said in its last `Advisor` call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Advice {
    pub slo: Option<Slo>,
    pub current_replicas: u32,
    pub target_utilization: f64,
    pub stabilization: Duration,
}

pub(crate) struct AgentState {
    pub tracer: Tracer,
    pub service: String,
    pub advertise: String,
    pub window_ms: u64,
    pub policy: PolicyConfig,
    pub capacity: Capacity,
    pub sender: Sender,
    pub metrics: AgentMetrics,
    inner: Mutex<Inner>,
}

struct Inner {
    config_slo: Option<Slo>,
    advice: Option<Advice>,
    window: Option<Arc<ClosedWindow>>,
    decision: Decision,
    recommendation: Option<Recommendation>,
    delegations: BTreeMap<u64, Vec<Delegated>>,
    neighbors: Neighbors,
    /// (window id, utilisation), oldest first.
    utilization: VecDeque<(u64, f64)>,
}

/// Reports to send: (neighbour service, agent, report).
type Outbox = Vec<(String, String, proto::NeighborReport)>;

impl AgentState {
    pub fn new(tracer: Tracer, config: &AgentBuilder, advertise: String, capacity: Capacity, sender: Sender) -> Self {
        Self {
            window_ms: tracer.window_clock().window_ms(),
            service: config.service.clone(),
            tracer,
            advertise,
            policy: config.policy.clone(),
            capacity,
            sender,
            metrics: AgentMetrics::default(),
            inner: Mutex::new(Inner {
                config_slo: config.slo,
                advice: None,
                window: None,
                decision: Decision::no_data("no window has closed yet"),
                recommendation: None,
                delegations: BTreeMap::new(),
                neighbors: Neighbors::new(config.max_neighbors),
                utilization: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn decision(&self) -> Decision {
        self.lock().decision.clone()
    }

    /// Runs the rule on the latest window with everything known now.
    fn decide_locked(&self, inner: &mut Inner) {
        let Some(window) = inner.window.clone() else { return };
        let stats = &window.stats;
        let advice = inner.advice;
        let slo = match advice {
            Some(advice) => advice.slo,
            None => inner.config_slo,
        };
        let target = advice.map_or(self.policy.target_utilization, |advice| advice.target_utilization);
        let load = utilization(stats, self.window_ms, self.capacity);
        let stabilization = advice.map_or(Duration::from_secs(300), |advice| advice.stabilization);
        let needed =
            ((stabilization.as_millis() as u64).div_ceil(self.window_ms.max(1)).max(1) as usize).min(MAX_HISTORY);
        let idle_below = self.policy.idle_fraction * target;
        let idle_throughout = inner.utilization.len() >= needed
            && inner.utilization.iter().rev().take(needed).all(|(_, value)| *value < idle_below);
        // One window's burst (a backlog released upstream, the noise of a short window) is not saturation: what
        // counts is the lower of this window's utilisation and the one just before it.
        let sustained = inner
            .utilization
            .iter()
            .rev()
            .find(|(id, _)| id.saturating_add(1) == stats.window_id)
            .map_or(0.0, |(_, before)| before.min(load.max()));
        let stale: HashSet<String> =
            inner.neighbors.iter().filter(|(_, n)| n.stale()).map(|(name, _)| name.clone()).collect();
        let neighbor_cpu: HashMap<String, f64> =
            inner.neighbors.iter().filter_map(|(name, n)| n.cpu_utilization.map(|u| (name.clone(), u))).collect();
        let delegations = inner.delegations.get(&stats.window_id).cloned().unwrap_or_default();
        let policy = PolicyConfig { target_utilization: target, ..self.policy.clone() };
        let input = PolicyInput {
            service: &self.service,
            stats,
            window_ms: self.window_ms,
            slo,
            delegations: &delegations,
            stale_callees: &stale,
            neighbor_cpu: &neighbor_cpu,
            cpu_utilization: load.cpu,
            utilization: sustained,
            idle_throughout,
        };
        let decision = decide(&input, &policy);
        let current = advice.map_or(1, |advice| advice.current_replicas);
        let recommendation = recommend(decision.verdict, stats, self.window_ms, current, target, self.capacity);
        inner.decision = decision;
        inner.recommendation = Some(recommendation);
    }

    /// The reports for the latest window: one to each agent of each neighbour on an edge with traffic; a
    /// delegation goes with the reports to callees the decision names. With `only_to`, just to those callees.
    fn outbox_locked(&self, inner: &Inner, only_to: Option<&[Arc<str>]>) -> Outbox {
        let Some(window) = &inner.window else { return Vec::new() };
        let stats = &window.stats;
        let decision = inner.decision.to_proto();
        let summary = report::summary(stats, utilization(stats, self.window_ms, self.capacity).cpu);
        let head = ReportHead {
            service: &self.service,
            agent: &self.advertise,
            window_id: stats.window_id,
            window_ms: self.window_ms,
            summary: &summary,
            decision: &decision,
        };
        let mut path: Vec<String> =
            inner.delegations.get(&stats.window_id).and_then(|d| d.first()).map(|d| d.path.clone()).unwrap_or_default();
        path.push(self.service.clone());
        // A full path means a loop or an absurd depth: stop passing the question on.
        let may_delegate = path.len() <= report::MAX_DELEGATION_PATH;
        let mut outbox = Vec::new();
        for (callee, edge) in &stats.outbound {
            if only_to.is_some_and(|only| !only.contains(callee)) {
                continue;
            }
            let delegated = may_delegate && inner.decision.delegated_to.contains(callee);
            let delegation = delegated.then(|| {
                let remote_wait_us = edge.remote_wait.percentile_us(inner.decision.percentile).unwrap_or(0);
                report::delegation(&inner.decision, &path, remote_wait_us)
            });
            for agent in &edge.callee_agents {
                outbox.push((callee.to_string(), agent.to_string(), head.to_callee(callee, edge, delegation.clone())));
            }
        }
        if only_to.is_none() {
            for (caller, edge) in &stats.inbound {
                for agent in &edge.caller_agents {
                    outbox.push((caller.to_string(), agent.to_string(), head.to_caller(caller, edge)));
                }
            }
        }
        outbox
    }

    /// A window closed: learn the neighbours, decide, and return the reports to send.
    fn on_window(&self, window: Arc<ClosedWindow>) -> Outbox {
        let mut inner = self.lock();
        let stats = &window.stats;
        for (caller, edge) in &stats.inbound {
            for agent in &edge.caller_agents {
                inner.neighbors.learn(caller, agent, stats.window_id);
            }
        }
        for (callee, edge) in &stats.outbound {
            for agent in &edge.callee_agents {
                inner.neighbors.learn(callee, agent, stats.window_id);
            }
        }
        inner.neighbors.expire(stats.window_id.saturating_sub(EXPIRE_AFTER));
        let load = utilization(stats, self.window_ms, self.capacity).max();
        inner.utilization.push_back((stats.window_id, load));
        while inner.utilization.len() > MAX_HISTORY {
            inner.utilization.pop_front();
        }
        let oldest_kept = stats.window_id.saturating_sub(DELEGATION_WINDOWS);
        inner.delegations.retain(|window_id, _| *window_id >= oldest_kept);
        inner.window = Some(window.clone());
        self.decide_locked(&mut inner);
        self.metrics.decided(inner.decision.verdict);
        tracing::debug!(
            service = %self.service,
            window = stats.window_id,
            verdict = inner.decision.verdict.as_str(),
            reason = %inner.decision.reason,
            "window decided"
        );
        self.outbox_locked(&inner, None)
    }

    /// Sends reports and notes which neighbours answered.
    pub async fn send(&self, outbox: Outbox) {
        if outbox.is_empty() {
            return;
        }
        let services: Vec<String> = outbox.iter().map(|(service, _, _)| service.clone()).collect();
        let bytes: usize = outbox.iter().map(|(_, _, report)| prost::Message::encoded_len(report)).sum();
        self.metrics.report_bytes(bytes as u64);
        let outcomes =
            self.sender.send_all(outbox.into_iter().map(|(_, agent, report)| (agent, report)).collect()).await;
        let mut inner = self.lock();
        for (service, (agent, outcome)) in services.iter().zip(outcomes) {
            self.metrics.sent(outcome.is_ok());
            if let Err(error) = &outcome {
                tracing::debug!(neighbor = %service, %agent, %error, "report not delivered");
            }
            inner.neighbors.sent(service, &agent, outcome.is_ok());
        }
    }

    /// A valid report arrived. Returns whether it was used, and reports to pass a delegation on.
    pub fn on_report(&self, report: ValidReport) -> (bool, Outbox) {
        let current = self.tracer.window_clock().window_id(Instant::now());
        // Window ids are untrusted: compare without overflowing.
        if report.window_id.saturating_add(DELEGATION_WINDOWS) < current || report.window_id > current.saturating_add(1)
        {
            self.metrics.received("stale_window");
            return (false, Vec::new());
        }
        let mut inner = self.lock();
        let known = inner.neighbors.heard_from(
            &report.from_service,
            &report.from_agent,
            report.window_id,
            report.decision,
            report.utilization,
        );
        if !known {
            self.metrics.received("not_a_neighbor");
            return (false, Vec::new());
        }
        self.metrics.received("accepted");
        // A delegation counts only when the report is about the edge from its sender to this service.
        let Some(delegation) =
            report.delegation.filter(|_| report.addressed_to.as_deref() == Some(self.service.as_str()))
        else {
            return (true, Vec::new());
        };
        if delegation.path.contains(&self.service) {
            // A loop in the call graph: this service already passed the question on.
            return (true, Vec::new());
        }
        let decided_window = inner.window.as_ref().map_or(0, |w| w.stats.window_id);
        if report.window_id < decided_window {
            // This service already decided a later window: too late to act on.
            return (false, Vec::new());
        }
        let entry = inner.delegations.entry(report.window_id).or_default();
        if entry.len() >= MAX_DELEGATIONS || entry.iter().any(|known| known.from == delegation.from) {
            return (true, Vec::new());
        }
        entry.push(delegation);
        if report.window_id != decided_window {
            // For a window not closed here yet: used when it closes.
            return (true, Vec::new());
        }
        // Already decided this window without the delegation: decide again, and pass it on to any callee it now
        // points at (whatever the verdict: in sum mode a root cause may also delegate).
        let before = inner.decision.clone();
        self.decide_locked(&mut inner);
        if inner.decision.verdict != before.verdict {
            self.metrics.decided(inner.decision.verdict);
        }
        let new_callees: Vec<Arc<str>> = inner
            .decision
            .delegated_to
            .iter()
            .filter(|callee| !before.delegated_to.contains(callee))
            .cloned()
            .collect();
        let outbox = if new_callees.is_empty() { Vec::new() } else { self.outbox_locked(&inner, Some(&new_callees)) };
        (true, outbox)
    }

    /// The operator's question: remember its SLO and settings, decide again on the latest window, answer.
    pub fn advise(&self, advice: Advice) -> proto::RecommendResponse {
        let mut inner = self.lock();
        inner.advice = Some(advice);
        self.decide_locked(&mut inner);
        let percentile = advice.slo.map_or(inner.decision.percentile, |slo| slo.percentile);
        let observed = inner.window.as_ref().and_then(|w| w.stats.total.percentile_us(percentile)).unwrap_or(0);
        proto::RecommendResponse {
            service: self.service.clone(),
            window_id: inner.window.as_ref().map_or(0, |w| w.stats.window_id),
            decision: Some(inner.decision.to_proto()),
            recommendation: Some(match &inner.recommendation {
                Some(recommendation) => recommendation.to_proto(),
                // No window yet: keep what there is.
                None => proto::Recommendation {
                    desired_replicas: advice.current_replicas,
                    reason: "no window has closed yet".to_string(),
                    ..Default::default()
                },
            }),
            observed_latency_us: observed,
            traffic: inner.window.as_ref().map(|w| traffic(&w.stats, self.window_ms, percentile)),
        }
    }

    pub fn snapshot(&self) -> AgentSnapshot {
        let inner = self.lock();
        proto::SnapshotResponse {
            last_window: inner.window.as_ref().map(|w| w.to_proto()),
            decision: Some(inner.decision.to_proto()),
            neighbors: inner
                .neighbors
                .iter()
                .flat_map(|(service, neighbor)| {
                    neighbor.agents.iter().map(move |(agent, state)| proto::NeighborStatus {
                        service: service.clone(),
                        agent: agent.clone(),
                        last_window_id: neighbor.last_window.unwrap_or(0),
                        stale: state.failed,
                        last_decision: neighbor.last_decision.clone(),
                    })
                })
                .collect(),
        }
    }

    pub fn neighbor_counts(&self) -> (usize, usize, u64) {
        let inner = self.lock();
        let stale = inner.neighbors.iter().filter(|(_, n)| n.stale()).count();
        (inner.neighbors.len(), stale, inner.neighbors.refused)
    }
}

/// The window task: decide and exchange on every closed window until told to stop.
pub(crate) async fn run_windows(state: Arc<AgentState>, mut stop: watch::Receiver<bool>) {
    let mut windows = state.tracer.subscribe();
    loop {
        tokio::select! {
            changed = windows.changed() => {
                if changed.is_err() {
                    return;
                }
                let Some(window) = windows.borrow_and_update().clone() else { continue };
                let outbox = state.on_window(window);
                // Sending runs beside the next window's wait: a slow neighbour never delays a decision.
                let sender = state.clone();
                tokio::spawn(async move { sender.send(outbox).await });
            }
            () = crate::agent::stop_requested(&mut stop) => return,
        }
    }
}

/// Callees reported per answer, the busiest first.
const MAX_CALLEE_RATES: usize = 64;

/// A window's traffic and waits at `percentile`, for the operator's dashboard.
fn traffic(stats: &WindowStats, window_ms: u64, percentile: f64) -> proto::Traffic {
    let seconds = (window_ms as f64 / 1000.0).max(0.001);
    let at = |histogram: &crate::aggregate::histogram::Histogram| histogram.percentile_us(percentile).unwrap_or(0);
    let mut callees: Vec<proto::CalleeRate> = stats
        .outbound
        .iter()
        .map(|(callee, edge)| proto::CalleeRate {
            callee: callee.to_string(),
            calls_per_second: edge.calls as f64 / seconds,
        })
        .collect();
    callees.sort_by(|a, b| b.calls_per_second.total_cmp(&a.calls_per_second).then_with(|| a.callee.cmp(&b.callee)));
    callees.truncate(MAX_CALLEE_RATES);
    proto::Traffic {
        requests_per_second: stats.requests as f64 / seconds,
        local_wait_us: at(&stats.local_wait),
        net_wait_us: stats.outbound.values().map(|edge| at(&edge.net_wait)).max().unwrap_or(0),
        remote_wait_us: stats.outbound.values().map(|edge| at(&edge.remote_wait)).max().unwrap_or(0),
        callees,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::decide::Verdict;

    fn state() -> AgentState {
        let tracer = Tracer::builder("svc-pool").window(Duration::from_secs(1)).build().unwrap();
        let config = AgentBuilder::new("svc-pool");
        let sender = Sender::new(Duration::from_millis(100), None, None).unwrap();
        AgentState::new(tracer, &config, "127.0.0.1:1".into(), Capacity { cores: 1.0, concurrency: Some(4.0) }, sender)
    }

    /// A 1 s window of 100 requests, each `own_ms` in the service: `own_ms × 100 / 1000 / 4` of the pool.
    fn window(window_id: u64, own_ms: u64) -> Arc<ClosedWindow> {
        let mut stats = WindowStats::new(window_id);
        for _ in 0..100 {
            stats.requests += 1;
            stats.arrivals += 1;
            stats.total.record(own_ms * 1000);
            stats.local_wait.record(own_ms * 1000);
        }
        Arc::new(ClosedWindow { service: "svc-pool".into(), window_ms: 1000, stats })
    }

    #[test]
    fn one_busy_window_is_a_burst_two_in_a_row_are_saturation() {
        let state = state();
        state.on_window(window(10, 10));
        assert_eq!(state.decision().verdict, Verdict::Healthy);
        // 90 % of the pool for one window (a backlog released upstream): not saturated.
        state.on_window(window(11, 36));
        assert_eq!(state.decision().verdict, Verdict::Healthy, "{:?}", state.decision());
        // And again: now it is.
        state.on_window(window(12, 36));
        assert_eq!(state.decision().verdict, Verdict::Saturated, "{:?}", state.decision());
        // A gap in the windows starts over.
        state.on_window(window(14, 36));
        assert_eq!(state.decision().verdict, Verdict::Healthy, "{:?}", state.decision());
    }
}
