//! The agent's state, and the wiring of one window's steps: on each closed window, learn the neighbours from this
//! service's own edges, take the reports held for it ([`crate::exchange::inbox`]), decide
//! ([`crate::decide::inputs`]) and send ([`crate::exchange::outbox`]); on each received report, take it and, for a
//! delegation, decide again and pass it on; on each `Advisor` question, answer (and, for the operator, remember).
//!
//! One mutex guards the state; it is taken by the window task, the gRPC handlers and the operator's calls, never
//! by the request path, and never held across an `.await`.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use rootscale_proto::v1 as proto;
use tokio::sync::watch;

use crate::{
    ClosedWindow, Tracer,
    agent::{metrics::AgentMetrics, settings::AgentBuilder},
    aggregate::WindowStats,
    decide::{
        Capacity, Decision, PolicyConfig, Recommendation, Verdict,
        inputs::{
            DecisionSettings, SettingsUpdate, UtilizationHistory, WindowInputs, decide_window, subtree_utilization,
        },
        recommend::{Utilization, utilization},
    },
    exchange::{
        inbox::{Inbox, Received},
        neighbors::{EXPIRE_AFTER, Neighbors},
        outbox::{self, Outbox},
        report::ValidReport,
        sender::Sender,
    },
};

/// What the agent knows, as the `Advisor.Snapshot` call returns it.
pub type AgentSnapshot = proto::SnapshotResponse;

pub(crate) struct AgentState {
    pub tracer: Tracer,
    pub service: String,
    pub advertise: String,
    pub window_ms: u64,
    pub policy: PolicyConfig,
    pub capacity: Capacity,
    pub sender: Sender,
    pub metrics: AgentMetrics,
    /// The latest decision that calls for more replicas, for `Advisor.Watch`: set as soon as it is made.
    needs_replicas: watch::Sender<Option<NeedsReplicas>>,
    inner: Mutex<Inner>,
}

/// A decision that calls for more replicas, as `Advisor.Watch` announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NeedsReplicas {
    pub window_id: u64,
    pub verdict: Verdict,
    pub desired_replicas: u32,
}

struct Inner {
    /// Configured at start, changed only by the authenticated operator.
    settings: DecisionSettings,
    window: Option<Arc<ClosedWindow>>,
    /// The latest window's load, worked out once when it closed (its decisions and reports use it).
    load: Utilization,
    decision: Decision,
    recommendation: Option<Recommendation>,
    inbox: Inbox,
    neighbors: Neighbors,
    history: UtilizationHistory,
}

/// Whose question an `Advisor` call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Asker {
    /// The authenticated operator: its settings are kept for later windows.
    Operator,
    /// Anyone else allowed to ask: its settings shape this answer only.
    Member,
}

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
            needs_replicas: watch::Sender::new(None),
            inner: Mutex::new(Inner {
                settings: DecisionSettings::configured(config.slo, &config.policy),
                window: None,
                load: Utilization::default(),
                decision: Decision::no_data("no window has closed yet"),
                recommendation: None,
                inbox: Inbox::default(),
                neighbors: Neighbors::new(config.max_neighbors),
                history: UtilizationHistory::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn decision(&self) -> Decision {
        self.lock().decision.clone()
    }

    /// Runs the rule on `window` with `settings` and everything known now.
    fn decide(&self, inner: &Inner, window: &WindowStats, settings: DecisionSettings) -> (Decision, Recommendation) {
        decide_window(&WindowInputs {
            service: &self.service,
            stats: window,
            window_ms: self.window_ms,
            capacity: self.capacity,
            load: inner.load,
            policy: &self.policy,
            settings,
            history: &inner.history,
            neighbors: &inner.neighbors,
            delegations: inner.inbox.delegations(window.window_id),
        })
    }

    /// Decides the latest window again with the settings in force, and keeps the result; one that calls for more
    /// replicas is announced to the watchers at once (once per window and verdict).
    fn redecide(&self, inner: &mut Inner) {
        let Some(window) = inner.window.clone() else { return };
        let (decision, recommendation) = self.decide(inner, &window.stats, inner.settings);
        if matches!(decision.verdict, Verdict::RootCause | Verdict::Saturated)
            && recommendation.desired_replicas > inner.settings.current_replicas
        {
            let news = NeedsReplicas {
                window_id: window.stats.window_id,
                verdict: decision.verdict,
                desired_replicas: recommendation.desired_replicas,
            };
            self.needs_replicas.send_if_modified(|last| {
                let known = last.is_some_and(|last| (last.window_id, last.verdict) == (news.window_id, news.verdict));
                if !known {
                    *last = Some(news);
                }
                !known
            });
        }
        inner.decision = decision;
        inner.recommendation = Some(recommendation);
    }

    /// The decisions that call for more replicas, from now on; the latest one first if it is still news (about a
    /// window at most [`REPLAY_WINDOWS`] before the current one). Older news would make every reopened watch act
    /// on a decision the periodic sync has long covered.
    pub fn watch_needs_replicas(&self) -> watch::Receiver<Option<NeedsReplicas>> {
        let mut receiver = self.needs_replicas.subscribe();
        let current = self.tracer.window_clock().window_id(std::time::Instant::now());
        if receiver.borrow().as_ref().is_some_and(|news| news.window_id.saturating_add(REPLAY_WINDOWS) >= current) {
            receiver.mark_changed();
        }
        receiver
    }

    /// The reports for the latest window (with `only_to`, just to those callees).
    fn outbox(&self, inner: &Inner, only_to: Option<&[Arc<str>]>) -> Outbox {
        let Some(window) = &inner.window else { return Vec::new() };
        let stats = &window.stats;
        let pressure = subtree_utilization(&inner.neighbors, stats.window_id);
        let callees_utilization = stats
            .outbound
            .keys()
            .filter_map(|callee| pressure.get(&**callee))
            .fold(0.0_f64, |largest, load| largest.max(*load));
        let from = outbox::Sender {
            service: &self.service,
            agent: &self.advertise,
            window_ms: self.window_ms,
            load: inner.load,
            callees_utilization,
        };
        outbox::reports(&from, stats, &inner.decision, inner.inbox.delegations(stats.window_id).first(), only_to)
    }

    /// A window closed: learn the neighbours, take the reports held for it, decide, and return the reports to send.
    fn on_window(&self, window: Arc<ClosedWindow>) -> Outbox {
        let mut inner = self.lock();
        let inner = &mut *inner;
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
        for outcome in inner.inbox.window_closed(&self.service, &mut inner.neighbors, stats.window_id) {
            self.count_received(outcome);
        }
        if let Some(previous) = &inner.window {
            // What the window before ended with, delegations and the operator's questions included.
            inner.history.ended_with(previous.stats.window_id, inner.decision.verdict);
        }
        inner.load = utilization(stats, self.window_ms, self.capacity);
        inner.history.push(stats.window_id, inner.load.max());
        inner.window = Some(window.clone());
        self.redecide(inner);
        self.metrics.decided(inner.decision.verdict);
        tracing::debug!(
            service = %self.service,
            window = stats.window_id,
            verdict = inner.decision.verdict.as_str(),
            reason = %inner.decision.reason,
            "window decided"
        );
        self.outbox(inner, None)
    }

    fn count_received(&self, outcome: Received) {
        match outcome {
            Received::Taken | Received::Redecide => self.metrics.received("accepted"),
            Received::Held => self.metrics.received("held"),
            Received::Refused(refusal) => {
                tracing::debug!(service = %self.service, reason = refusal.as_str(), "refused a report");
                self.metrics.received(refusal.as_str());
            }
        }
    }

    /// Sends reports and notes which neighbours answered.
    pub async fn send(&self, outbox: Outbox) {
        if outbox.is_empty() {
            return;
        }
        let bytes: usize = outbox.iter().map(|outgoing| prost::Message::encoded_len(&outgoing.report)).sum();
        self.metrics.report_bytes(bytes as u64);
        let outcomes = self.sender.send_all(outbox).await;
        let mut inner = self.lock();
        for (outgoing, outcome) in outcomes {
            self.metrics.sent(outcome.is_ok());
            if let Err(error) = &outcome {
                tracing::debug!(neighbor = %outgoing.service, agent = %outgoing.agent, %error, "report not delivered");
            }
            inner.neighbors.sent(&outgoing.service, &outgoing.agent, outcome.is_ok());
        }
    }

    /// A valid report arrived from an authenticated peer. Returns whether it was taken, and the reports that pass a
    /// delegation on.
    pub fn on_report(&self, report: ValidReport) -> (bool, Outbox) {
        let now = self.tracer.window_clock().window_id(Instant::now());
        let mut inner = self.lock();
        let inner = &mut *inner;
        let decided = inner.window.as_ref().map(|w| w.stats.window_id);
        let outcome = inner.inbox.receive(&self.service, &mut inner.neighbors, report, now, decided);
        self.count_received(outcome);
        match outcome {
            // A held report is not used yet: the acknowledgement says so.
            Received::Refused(_) | Received::Held => (false, Vec::new()),
            Received::Taken => (true, Vec::new()),
            Received::Redecide => {
                // Already decided this window without the delegation: decide again, and pass it on to any callee
                // it now points at (whatever the verdict: in sum mode a root cause may also delegate).
                let before = inner.decision.clone();
                self.redecide(inner);
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
                let outbox = if new_callees.is_empty() { Vec::new() } else { self.outbox(inner, Some(&new_callees)) };
                (true, outbox)
            }
        }
    }

    /// An `Advisor` question: decide the latest window with the settings it asks for and answer. Only the
    /// operator's settings are kept for later windows; an empty field keeps the setting in force.
    pub fn advise(&self, update: &SettingsUpdate, asker: Asker) -> proto::RecommendResponse {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let settings = inner.settings.with(update);
        let answer = match inner.window.clone() {
            Some(window) if asker == Asker::Operator => {
                inner.settings = settings;
                self.redecide(inner);
                inner.recommendation.clone().map(|recommendation| (inner.decision.clone(), recommendation, window))
            }
            Some(window) => {
                let (decision, recommendation) = self.decide(inner, &window.stats, settings);
                Some((decision, recommendation, window))
            }
            None => {
                if asker == Asker::Operator {
                    inner.settings = settings;
                }
                None
            }
        };
        let percentile = settings.slo.map_or(inner.decision.percentile, |slo| slo.percentile);
        match answer {
            Some((decision, recommendation, window)) => proto::RecommendResponse {
                service: self.service.clone(),
                window_id: window.stats.window_id,
                decision: Some(decision.to_proto()),
                recommendation: Some(recommendation.to_proto()),
                observed_latency_us: window.stats.total.percentile_us(percentile).unwrap_or(0),
                traffic: Some(traffic(&window.stats, self.window_ms, percentile)),
            },
            // No window yet: keep what there is.
            None => proto::RecommendResponse {
                service: self.service.clone(),
                window_id: 0,
                decision: Some(inner.decision.to_proto()),
                recommendation: Some(proto::Recommendation {
                    desired_replicas: settings.current_replicas,
                    reason: "no window has closed yet".to_string(),
                    ..Default::default()
                }),
                observed_latency_us: 0,
                traffic: None,
            },
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

/// The window task: decide and exchange on every closed window until told to stop. The mesh key file is read
/// again first, so a rotated key is in force from the next window on.
pub(crate) async fn run_windows(state: Arc<AgentState>, mut stop: watch::Receiver<bool>) {
    let mut windows = state.tracer.subscribe();
    loop {
        tokio::select! {
            changed = windows.changed() => {
                if changed.is_err() {
                    return;
                }
                let Some(window) = windows.borrow_and_update().clone() else { continue };
                match state.tracer.reload_keys() {
                    Ok(true) => tracing::info!(service = %state.service, "mesh key file changed: new keys in force"),
                    Ok(false) => {}
                    Err(error) => tracing::warn!(%error, "mesh key file unreadable: the keys in force stay"),
                }
                let outbox = state.on_window(window);
                // Sending runs beside the next window's wait: a slow neighbour never delays a decision.
                let sender = state.clone();
                tokio::spawn(async move { sender.send(outbox).await });
            }
            () = crate::agent::stop_requested(&mut stop) => return,
        }
    }
}

/// How many windows old the last decision may be for a watch just opened to hear it.
const REPLAY_WINDOWS: u64 = 2;

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
        let sender = Sender::new(Duration::from_millis(100), None, None, None).unwrap();
        AgentState::new(
            tracer,
            &config,
            "127.0.0.1:1".into(),
            Capacity { cores: 1.0, concurrency: Some(4.0), pool_scope: Default::default() },
            sender,
        )
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

    #[test]
    fn a_watch_opened_later_hears_the_last_decision_only_while_it_is_news() {
        let fresh_state = state();
        let now = fresh_state.tracer.window_clock().window_id(std::time::Instant::now());
        // Two saturated windows that end just before the current one: news, replayed to a new watcher.
        fresh_state.on_window(window(now - 2, 36));
        fresh_state.on_window(window(now - 1, 36));
        assert_eq!(fresh_state.decision().verdict, Verdict::Saturated, "{:?}", fresh_state.decision());
        let mut fresh = fresh_state.watch_needs_replicas();
        assert!(fresh.has_changed().unwrap(), "the last decision is replayed");
        assert_eq!(fresh.borrow_and_update().map(|news| news.window_id), Some(now - 1));
        // The same decision, about windows long closed: a watcher opened now does not hear it.
        let old = state();
        old.on_window(window(now - 5, 36));
        old.on_window(window(now - 4, 36));
        assert_eq!(old.decision().verdict, Verdict::Saturated, "{:?}", old.decision());
        let stale = old.watch_needs_replicas();
        assert!(!stale.has_changed().unwrap(), "{:?}", *stale.borrow());
    }
}
