//! The agent's state: one replica's [`Decider`] behind a mutex, wired to the tracer's windows, the gRPC handlers, the
//! sender, the metrics and `Advisor.Watch`. The decision loop itself (learn, take the held reports, decide, build the
//! reports; decide again on a delegation) is the decider's; this module only counts and announces what it did.
//!
//! The mutex is taken by the window task, the gRPC handlers and the operator's calls, never by the request path,
//! and never held across an `.await`.

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
        Capacity, Decision, Verdict,
        decider::{Decider, DeciderConfig},
        inputs::{DecisionSettings, SettingsUpdate},
    },
    exchange::{inbox::Received, outbox::Outbox, report::ValidReport, sender::Sender},
};

/// What the agent knows, as the `Advisor.Snapshot` call returns it.
pub type AgentSnapshot = proto::SnapshotResponse;

pub(crate) struct AgentState {
    pub tracer: Tracer,
    pub service: String,
    pub window_ms: u64,
    pub sender: Sender,
    pub metrics: AgentMetrics,
    /// The latest decision that calls for more replicas, for `Advisor.Watch`: set as soon as it is made.
    needs_replicas: watch::Sender<Option<NeedsReplicas>>,
    decider: Mutex<Decider>,
}

/// A decision that calls for more replicas, as `Advisor.Watch` announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NeedsReplicas {
    pub window_id: u64,
    pub verdict: Verdict,
    pub desired_replicas: u32,
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
        let window_ms = tracer.window_clock().window_ms();
        let decider = Decider::new(
            DeciderConfig {
                service: config.service.clone(),
                advertise,
                window_ms,
                policy: config.policy.clone(),
                capacity,
                max_neighbors: config.max_neighbors,
            },
            DecisionSettings::configured(config.slo, &config.policy),
        );
        Self {
            window_ms,
            service: config.service.clone(),
            tracer,
            sender,
            metrics: AgentMetrics::default(),
            needs_replicas: watch::Sender::new(None),
            decider: Mutex::new(decider),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Decider> {
        self.decider.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn decision(&self) -> Decision {
        self.lock().decision().clone()
    }

    /// Announces the decider's latest decision to the watchers if it calls for more replicas (once per window and
    /// verdict).
    fn announce(&self, decider: &Decider) {
        let (Some(window), Some(recommendation)) = (decider.window(), decider.recommendation()) else { return };
        let verdict = decider.decision().verdict;
        if !matches!(verdict, Verdict::RootCause | Verdict::Saturated)
            || recommendation.desired_replicas <= decider.settings().current_replicas
        {
            return;
        }
        let news = NeedsReplicas {
            window_id: window.stats.window_id,
            verdict,
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

    /// A window closed: the decider decides it; count, announce, and return the reports to send.
    fn on_window(&self, window: Arc<ClosedWindow>) -> Outbox {
        let mut decider = self.lock();
        let (outbox, received) = decider.on_window(window);
        for outcome in received {
            self.count_received(outcome);
        }
        self.announce(&decider);
        let decision = decider.decision();
        self.metrics.decided(decision.verdict);
        tracing::debug!(
            service = %self.service,
            window = decider.window().map_or(0, |w| w.stats.window_id),
            verdict = decision.verdict.as_str(),
            reason = %decision.reason,
            "window decided"
        );
        outbox
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
        let mut decider = self.lock();
        for (outgoing, outcome) in outcomes {
            self.metrics.sent(outcome.is_ok());
            if let Err(error) = &outcome {
                tracing::debug!(neighbor = %outgoing.service, agent = %outgoing.agent, %error, "report not delivered");
            }
            decider.sent(&outgoing.service, &outgoing.agent, outcome.is_ok());
        }
    }

    /// A valid report arrived from an authenticated peer. Returns whether it was taken, and the reports that pass a
    /// delegation on.
    pub fn on_report(&self, report: ValidReport) -> (bool, Outbox) {
        let now = self.tracer.window_clock().window_id(Instant::now());
        let mut decider = self.lock();
        let outcome = decider.on_report(report, now);
        self.count_received(outcome.received);
        if outcome.redecided {
            self.announce(&decider);
            if outcome.verdict_changed {
                self.metrics.decided(decider.decision().verdict);
            }
        }
        (outcome.taken, outcome.outbox)
    }

    /// An `Advisor` question: decide the latest window with the settings it asks for and answer. Only the
    /// operator's settings are kept for later windows; an empty field keeps the setting in force.
    pub fn advise(&self, update: &SettingsUpdate, asker: Asker) -> proto::RecommendResponse {
        let mut decider = self.lock();
        let settings = decider.settings().with(update);
        let answer = match decider.window().cloned() {
            Some(window) if asker == Asker::Operator => {
                decider.set_settings(update);
                self.announce(&decider);
                decider
                    .recommendation()
                    .cloned()
                    .map(|recommendation| (decider.decision().clone(), recommendation, window))
            }
            Some(window) => {
                let (decision, recommendation) = decider.decide(&window.stats, settings);
                Some((decision, recommendation, window))
            }
            None => {
                if asker == Asker::Operator {
                    decider.set_settings(update);
                }
                None
            }
        };
        let percentile = settings.slo.map_or(decider.decision().percentile, |slo| slo.percentile);
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
                decision: Some(decider.decision().to_proto()),
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
        let decider = self.lock();
        proto::SnapshotResponse {
            last_window: decider.window().map(|w| w.to_proto()),
            decision: Some(decider.decision().to_proto()),
            neighbors: decider
                .neighbors()
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
        let decider = self.lock();
        let neighbors = decider.neighbors();
        let stale = neighbors.iter().filter(|(_, n)| n.stale()).count();
        (neighbors.len(), stale, neighbors.refused)
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
