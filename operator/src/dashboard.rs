//! The operator's side of the dashboard: every managed Deployment becomes a service on the graph, with what its
//! pods' agents answered in the last reconcile (verdict, latency against the SLO, waits, calls per second to
//! each callee) and every scaling decision on the timeline. Edges come from the agents' calls: a callee service
//! is drawn as the Deployment in the same namespace whose agents speak for that service.
//!
//! Reconciles update a table; a frame of the whole table is published at most once a second, so a thousand
//! Deployments do not mean a thousand frames per sync.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rootscale_dashboard::{Dashboard, EdgeView, Event, EventKind, Frame, ServiceView};

use crate::agents::Answer;

/// A Deployment not reconciled for this long has gone (or left the operator's hands) and leaves the graph.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// What one reconcile saw and did.
#[derive(Debug)]
pub struct Observed<'a> {
    pub namespace: &'a str,
    pub deployment: &'a str,
    pub current: u32,
    pub desired: u32,
    pub applied: bool,
    /// `enforce` or `recommend` (a recommendation is shown, not applied).
    pub mode: &'a str,
    /// The Deployment's combined verdict and where it points.
    pub verdict: &'a str,
    pub suspect: Option<&'a str>,
    pub reason: &'a str,
    pub slo: Option<Duration>,
    pub answers: &'a [Answer],
}

struct Seen {
    view: ServiceView,
    /// The services its agents speak for.
    services: BTreeSet<String>,
    /// Calls per second to each callee service, all pods.
    calls: BTreeMap<String, f64>,
    /// Delegated to, as service names.
    delegated_to: BTreeSet<String>,
    entry: bool,
    at: Instant,
}

/// The operator's dashboard feed.
pub struct Board {
    pub dashboard: Dashboard,
    deployments: Mutex<BTreeMap<(String, String), Seen>>,
    changed: AtomicBool,
}

impl Default for Board {
    fn default() -> Self {
        Self {
            dashboard: Dashboard::new("Kubernetes: managed Deployments", "kubernetes"),
            deployments: Mutex::new(BTreeMap::new()),
            changed: AtomicBool::new(false),
        }
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

impl Board {
    /// Takes in one reconcile; puts scaling actions and new root causes on the timeline.
    pub fn observe(&self, seen: Observed<'_>) {
        let key = (seen.namespace.to_string(), seen.deployment.to_string());
        let mut view = ServiceView {
            name: seen.deployment.to_string(),
            group: seen.namespace.to_string(),
            replicas: seen.current,
            desired: (seen.desired != seen.current).then_some(seen.desired),
            verdict: seen.verdict.to_string(),
            detail: String::new(),
            target_ms: seen.slo.map(ms),
            ..ServiceView::default()
        };
        let mut services = BTreeSet::new();
        let mut calls: BTreeMap<String, f64> = BTreeMap::new();
        let mut delegated_to = BTreeSet::new();
        for answer in seen.answers {
            if let Some(latency) = answer.observed_latency {
                view.latency_ms = view.latency_ms.max(ms(latency));
            }
            services.extend(answer.service.iter().cloned());
            if answer.advice().is_some_and(|a| a.verdict.as_str() == seen.verdict) {
                delegated_to.extend(answer.delegated_to.iter().cloned());
            }
            if let Some(traffic) = &answer.traffic {
                view.rps += traffic.requests_per_second;
                view.local_wait_ms = view.local_wait_ms.max(ms(traffic.local_wait));
                view.net_wait_ms = view.net_wait_ms.max(ms(traffic.net_wait));
                view.remote_wait_ms = view.remote_wait_ms.max(ms(traffic.remote_wait));
                for (callee, rate) in &traffic.callees {
                    *calls.entry(callee.clone()).or_default() += rate;
                }
            }
        }
        // Where it points, unless that is itself.
        if let Some(suspect) = seen.suspect.filter(|s| !services.contains(*s) && *s != seen.deployment) {
            view.detail = format!("-> {suspect}");
        }
        let mut deployments = self.deployments.lock().unwrap_or_else(|p| p.into_inner());
        let before = deployments.get(&key).map(|s| s.view.verdict.clone());
        if seen.desired != seen.current {
            let (kind, text) = match (seen.applied, seen.mode) {
                (true, _) => {
                    (EventKind::Scale, format!("{} {} → {} replicas", seen.deployment, seen.current, seen.desired))
                }
                (false, "recommend") => (
                    EventKind::Decision,
                    format!("{} would go {} → {} (recommend mode)", seen.deployment, seen.current, seen.desired),
                ),
                (false, _) => (EventKind::Decision, format!("{} not scaled to {}", seen.deployment, seen.desired)),
            };
            self.dashboard.record(Event::new(kind, seen.deployment, text, seen.reason));
        }
        let culprit = matches!(seen.verdict, "root-cause" | "network" | "saturated");
        if culprit && before.as_deref() != Some(seen.verdict) {
            let text = format!("{} says {}", seen.deployment, seen.verdict);
            self.dashboard.record(Event::new(EventKind::Decision, seen.deployment, text, seen.reason));
        }
        deployments
            .insert(key, Seen { view, services, calls, delegated_to, entry: seen.slo.is_some(), at: Instant::now() });
        self.changed.store(true, Ordering::Release);
    }

    /// A Deployment is gone.
    pub fn forget(&self, namespace: &str, deployment: &str) {
        let removed = self
            .deployments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(namespace.to_string(), deployment.to_string()));
        if removed.is_some() {
            self.changed.store(true, Ordering::Release);
        }
    }

    /// Keeps only the Deployments `keep` (namespace, name) says are still managed.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut deployments = self.deployments.lock().unwrap_or_else(|p| p.into_inner());
        let before = deployments.len();
        deployments.retain(|(namespace, name), _| keep(namespace, name));
        if deployments.len() != before {
            self.changed.store(true, Ordering::Release);
        }
    }

    /// Publishes a frame if anything changed since the last one.
    pub fn publish_if_changed(&self) {
        if !self.changed.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut deployments = self.deployments.lock().unwrap_or_else(|p| p.into_inner());
        deployments.retain(|_, seen| seen.at.elapsed() < FORGET_AFTER);
        // Which Deployment speaks for a service, per namespace.
        let mut speaks_for: BTreeMap<(&str, &str), &str> = BTreeMap::new();
        for ((namespace, name), seen) in deployments.iter() {
            for service in &seen.services {
                speaks_for.insert((namespace, service), name);
            }
        }
        let deployment_of =
            |namespace: &str, service: &str| speaks_for.get(&(namespace, service)).map(|name| name.to_string());
        let mut services = Vec::new();
        let mut edges = Vec::new();
        let mut entries = Vec::new();
        for ((namespace, name), seen) in deployments.iter() {
            let mut view = seen.view.clone();
            view.delegated_to =
                seen.delegated_to.iter().filter_map(|service| deployment_of(namespace, service)).collect();
            services.push(view);
            if seen.entry {
                entries.push(name.clone());
            }
            for (callee, rate) in &seen.calls {
                if let Some(to) = deployment_of(namespace, callee) {
                    edges.push(EdgeView { from: name.clone(), to, rps: *rate });
                }
            }
        }
        drop(deployments);
        self.dashboard.publish(Frame::new(services, edges, entries));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        agents::Traffic,
        engine::{Advice, Verdict},
    };

    fn answer(service: &str, verdict: Verdict, delegated_to: &[&str], calls: &[(&str, f64)]) -> Answer {
        Answer {
            pod: format!("{service}-0"),
            advice: Ok(Advice { verdict, usage_ratio: 1.0 }),
            observed_latency: Some(Duration::from_millis(80)),
            reason: String::new(),
            suspect: None,
            service: Some(service.into()),
            delegated_to: delegated_to.iter().map(|s| s.to_string()).collect(),
            traffic: Some(Traffic {
                requests_per_second: 50.0,
                callees: calls.iter().map(|(c, r)| (c.to_string(), *r)).collect(),
                ..Traffic::default()
            }),
        }
    }

    #[test]
    fn deployments_become_a_graph_with_the_delegation_path() {
        let board = Board::default();
        let front = [answer("web-svc", Verdict::Delegated, &["db-svc"], &[("db-svc", 50.0)])];
        let db = [answer("db-svc", Verdict::RootCause, &[], &[])];
        let observed = |deployment, verdict, desired, answers| Observed {
            namespace: "shop",
            deployment,
            current: 1,
            desired,
            applied: desired != 1,
            mode: "enforce",
            verdict,
            suspect: None,
            reason: "because",
            slo: (deployment == "web").then_some(Duration::from_millis(100)),
            answers,
        };
        board.observe(observed("web", "delegated", 1, &front));
        board.observe(observed("db", "root-cause", 3, &db));
        board.publish_if_changed();
        let frame = board.dashboard.latest().unwrap();
        assert_eq!(frame.entries, vec!["web".to_string()]);
        assert_eq!(frame.edges, vec![EdgeView { from: "web".into(), to: "db".into(), rps: 50.0 }]);
        assert_eq!(frame.path, vec![("web".to_string(), "db".to_string())]);
        let events: Vec<EventKind> = board.dashboard.state().events.iter().map(|e| e.kind).collect();
        assert_eq!(events, vec![EventKind::Scale, EventKind::Decision]);
        // Nothing changed: no new frame.
        board.publish_if_changed();
        assert_eq!(board.dashboard.state().frames.len(), 1);
        board.forget("shop", "db");
        board.publish_if_changed();
        assert_eq!(board.dashboard.latest().unwrap().services.len(), 1);
    }
}
