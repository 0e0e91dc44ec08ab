//! One replica's decision loop, with no clock, socket or lock of its own: it takes closed windows and received
//! reports, decides, and returns the reports to send. The agent ([`crate::agent`]) wraps it in a mutex and
//! wires it to the tracer's windows, the gRPC handlers and the sender; the simulator (`rootscale-examples`'
//! `simulate`) drives thousands of them with the same code.
//!
//! On each closed window: learn the neighbours from this service's own edges, take the reports held for it
//! ([`crate::exchange::inbox`]), decide ([`crate::decide::inputs`]) and build the reports
//! ([`crate::exchange::outbox`]). On each received report: take it and, for a delegation of a window already
//! decided, decide again and pass it on to the callees it newly points at.

use std::sync::Arc;

use crate::{
    ClosedWindow,
    aggregate::WindowStats,
    decide::{
        Capacity, Decision, PolicyConfig, PoolScope, Recommendation, Verdict,
        inputs::{
            DecisionSettings, SettingsUpdate, UtilizationHistory, WindowInputs, decide_window, subtree_utilization,
        },
        recommend::{Utilization, utilization},
    },
    exchange::{
        inbox::{Inbox, Received},
        neighbors::{EXPIRE_AFTER, Neighbors},
        outbox::{self, Outbox, Recipients},
        report::ValidReport,
    },
};

/// Who a replica is and what it runs with: fixed for its life.
#[derive(Clone, Debug)]
pub struct DeciderConfig {
    pub service: String,
    /// The agent address neighbours reach this replica at.
    pub advertise: String,
    pub window_ms: u64,
    pub policy: PolicyConfig,
    pub capacity: Capacity,
    /// Neighbours remembered at most.
    pub max_neighbors: usize,
}

/// One replica's decisions and what they rest on.
pub struct Decider {
    config: DeciderConfig,
    /// Configured at start, then changed only by the authenticated operator.
    settings: DecisionSettings,
    window: Option<Arc<ClosedWindow>>,
    /// The latest window's load, worked out once when it closed (its decisions and reports use it).
    load: Utilization,
    decision: Decision,
    recommendation: Option<Recommendation>,
    inbox: Inbox,
    neighbors: Neighbors,
    history: UtilizationHistory,
    /// The subtree utilisation the latest window's reports to the callers carried.
    reported_up: f64,
}

/// What a received report did.
pub struct ReportOutcome {
    pub received: Received,
    /// Whether the report was used now (not refused, not held for a later window).
    pub taken: bool,
    /// Whether the latest window was decided again.
    pub redecided: bool,
    /// Whether the decision was made again and its verdict changed.
    pub verdict_changed: bool,
    /// The reports that pass a delegation on.
    pub outbox: Outbox,
}

impl Decider {
    pub fn new(config: DeciderConfig, settings: DecisionSettings) -> Self {
        Self {
            neighbors: Neighbors::new(config.max_neighbors),
            config,
            settings,
            window: None,
            load: Utilization::default(),
            decision: Decision::no_data("no window has closed yet"),
            recommendation: None,
            inbox: Inbox::default(),
            history: UtilizationHistory::default(),
            reported_up: 0.0,
        }
    }

    pub fn config(&self) -> &DeciderConfig {
        &self.config
    }

    pub fn settings(&self) -> DecisionSettings {
        self.settings
    }

    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    pub fn recommendation(&self) -> Option<&Recommendation> {
        self.recommendation.as_ref()
    }

    /// The latest closed window, once there is one.
    pub fn window(&self) -> Option<&Arc<ClosedWindow>> {
        self.window.as_ref()
    }

    pub fn neighbors(&self) -> &Neighbors {
        &self.neighbors
    }

    /// Runs the rule on `window` with `settings` and everything known now, keeping nothing.
    pub fn decide(&self, window: &WindowStats, settings: DecisionSettings) -> (Decision, Recommendation) {
        decide_window(&WindowInputs {
            service: &self.config.service,
            stats: window,
            window_ms: self.config.window_ms,
            capacity: self.config.capacity,
            load: self.load,
            policy: &self.config.policy,
            settings,
            history: &self.history,
            neighbors: &self.neighbors,
            delegations: self.inbox.delegations(window.window_id),
        })
    }

    /// Decides the latest window again with the settings in force, and keeps the result.
    pub fn redecide(&mut self) {
        let Some(window) = self.window.clone() else { return };
        let (decision, recommendation) = self.decide(&window.stats, self.settings);
        self.decision = decision;
        self.recommendation = Some(recommendation);
    }

    /// The settings in force with `update` applied, kept, and the latest window decided again with them.
    pub fn set_settings(&mut self, update: &SettingsUpdate) {
        self.settings = self.settings.with(update);
        self.redecide();
    }

    /// A window closed: learn the neighbours, take the reports held for it, decide, and return the reports to
    /// send, with what became of each held report.
    pub fn on_window(&mut self, window: Arc<ClosedWindow>) -> (Outbox, Vec<Received>) {
        let stats = &window.stats;
        for (caller, edge) in &stats.inbound {
            for agent in &edge.caller_agents {
                self.neighbors.learn(caller, agent, stats.window_id);
            }
        }
        for (callee, edge) in &stats.outbound {
            for agent in &edge.callee_agents {
                self.neighbors.learn(callee, agent, stats.window_id);
            }
        }
        self.neighbors.expire(stats.window_id.saturating_sub(EXPIRE_AFTER));
        let received = self.inbox.window_closed(&self.config.service, &mut self.neighbors, stats.window_id);
        if let Some(previous) = &self.window {
            // What the window before ended with, delegations and the operator's questions included.
            self.history.ended_with(previous.stats.window_id, self.decision.verdict);
        }
        self.load = utilization(stats, self.config.window_ms, self.config.capacity);
        self.history.push(stats.window_id, self.load.max());
        self.window = Some(window.clone());
        self.redecide();
        (self.outbox(Recipients::All), received)
    }

    /// A valid report arrived from an authenticated peer, in window `now` (by the receiver's clock).
    pub fn on_report(&mut self, report: ValidReport, now: u64) -> ReportOutcome {
        let decided = self.window.as_ref().map(|w| w.stats.window_id);
        // A callee's report about the window just decided: news of its subtree's pressure.
        let from_callee_about_decided = self.window.as_ref().is_some_and(|window| {
            window.stats.window_id == report.window_id
                && window.stats.outbound.contains_key(report.from_service.as_str())
        });
        let received = self.inbox.receive(&self.config.service, &mut self.neighbors, report, now, decided);
        let unchanged =
            |taken| ReportOutcome { received, taken, redecided: false, verdict_changed: false, outbox: Vec::new() };
        match received {
            // A held report is not used yet: the acknowledgement says so.
            Received::Refused(_) | Received::Held => unchanged(false),
            // Already decided this window without the delegation: decide again, and pass it on to any callee it now
            // points at (whatever the verdict: in sum mode a root cause may also delegate).
            Received::Redecide => self.redecide_and_pass_on(received),
            // A callee's pressure for the window just decided, arriving after the decision: in a thread-per-request
            // service that named itself, the queue for its workers may be that callee's doing (decide/pool.rs).
            Received::Taken if from_callee_about_decided && self.pool_wait_may_be_a_callees() => {
                self.redecide_and_pass_on(received)
            }
            Received::Taken if from_callee_about_decided => {
                let outbox = self.pressure_news();
                ReportOutcome { outbox, ..unchanged(true) }
            }
            Received::Taken => unchanged(true),
        }
    }

    /// Reports to the callers again when a callee's news put this service's subtree at or above the saturation
    /// level after its window's reports went out: pressure then climbs the graph within the window, one delivery
    /// per hop, instead of one window per hop. A caller whose workers wait on this subtree needs it now.
    fn pressure_news(&mut self) -> Outbox {
        let saturation = self.config.policy.saturation;
        let subtree = self.load.max().max(self.callees_utilization());
        if subtree >= saturation && self.reported_up < saturation {
            self.outbox(Recipients::Callers)
        } else {
            Vec::new()
        }
    }

    /// Whether this replica's verdict rests on a queue for workers it holds across calls: news of a callee's
    /// pressure can move it.
    fn pool_wait_may_be_a_callees(&self) -> bool {
        self.config.capacity.pool_scope == PoolScope::Request
            && matches!(self.decision.verdict, Verdict::RootCause | Verdict::Saturated)
    }

    fn redecide_and_pass_on(&mut self, received: Received) -> ReportOutcome {
        let before = self.decision.clone();
        self.redecide();
        let new_callees: Vec<Arc<str>> =
            self.decision.delegated_to.iter().filter(|callee| !before.delegated_to.contains(callee)).cloned().collect();
        let mut outbox =
            if new_callees.is_empty() { Vec::new() } else { self.outbox(Recipients::Callees(&new_callees)) };
        outbox.extend(self.pressure_news());
        ReportOutcome {
            received,
            taken: true,
            redecided: true,
            verdict_changed: self.decision.verdict != before.verdict,
            outbox,
        }
    }

    /// The largest subtree utilisation the callees of the latest window report (0 before any window).
    fn callees_utilization(&self) -> f64 {
        let Some(window) = &self.window else { return 0.0 };
        let stats = &window.stats;
        let pressure = subtree_utilization(&self.neighbors, stats.window_id);
        stats
            .outbound
            .keys()
            .filter_map(|callee| pressure.get(&**callee))
            .fold(0.0_f64, |largest, load| largest.max(*load))
    }

    /// The reports for the latest window, to `to`.
    fn outbox(&mut self, to: Recipients<'_>) -> Outbox {
        let Some(window) = &self.window else { return Vec::new() };
        let stats = &window.stats;
        let callees_utilization = self.callees_utilization();
        if matches!(to, Recipients::All | Recipients::Callers) {
            self.reported_up = self.load.max().max(callees_utilization);
        }
        let from = outbox::Sender {
            service: &self.config.service,
            agent: &self.config.advertise,
            window_ms: self.config.window_ms,
            load: self.load,
            callees_utilization,
        };
        outbox::reports(&from, stats, &self.decision, self.inbox.delegations(stats.window_id).first(), to)
    }

    /// Neighbour `service`'s agent `agent` was sent a report; `answered` says whether it took it.
    pub fn sent(&mut self, service: &str, agent: &str, answered: bool) {
        self.neighbors.sent(service, agent, answered);
    }
}
