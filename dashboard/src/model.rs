//! What the dashboard shows, in the shape the page reads.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// One service (a Deployment in Kubernetes) at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ServiceView {
    pub name: String,
    /// The namespace (Kubernetes) or the topology (local mode).
    pub group: String,
    pub replicas: u32,
    /// Where a scaling action is taking it, when it differs from `replicas`.
    pub desired: Option<u32>,
    /// The agents' verdict (`root-cause`, `delegated`, `network`, …); empty when none is known.
    pub verdict: String,
    /// Where the verdict points: the kind of local wait, the slow link, the callees delegated to.
    pub detail: String,
    pub delegated_to: Vec<String>,
    /// Latency at the SLO percentile, and the SLO (entry) or budget it is held against.
    pub latency_ms: f64,
    pub target_ms: Option<f64>,
    pub local_wait_ms: f64,
    pub net_wait_ms: f64,
    pub remote_wait_ms: f64,
    pub rps: f64,
}

/// Calls from one service to another.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EdgeView {
    pub from: String,
    pub to: String,
    pub rps: f64,
}

/// Everything at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Frame {
    pub unix_ms: u64,
    pub services: Vec<ServiceView>,
    pub edges: Vec<EdgeView>,
    /// Services requests enter by.
    pub entries: Vec<String>,
    /// The delegation path from the entries to the root cause, as calls (from, to).
    pub path: Vec<(String, String)>,
    /// One line saying what is wrong, if anything.
    pub headline: String,
}

/// What a timeline entry is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A fault injected (local mode).
    Fault,
    /// A replica count changed (or, in recommend mode, would have).
    Scale,
    /// A verdict worth noting: a root cause found, a slow link.
    Decision,
}

/// One timeline entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub unix_ms: u64,
    pub kind: EventKind,
    pub service: String,
    pub text: String,
    pub reason: String,
}

impl Event {
    pub fn new(kind: EventKind, service: &str, text: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { unix_ms: unix_ms(), kind, service: service.to_string(), text: text.into(), reason: reason.into() }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A verdict that ends a delegation path.
fn is_culprit(verdict: &str) -> bool {
    matches!(verdict, "root-cause" | "network" | "saturated")
}

impl Frame {
    /// A frame of `services` and `edges` now, with the delegation path and the headline worked out.
    pub fn new(services: Vec<ServiceView>, edges: Vec<EdgeView>, entries: Vec<String>) -> Self {
        let path = delegation_path(&services, &entries);
        let headline = headline(&services, &entries);
        Self { unix_ms: unix_ms(), services, edges, entries, path, headline }
    }
}

/// The calls along which delegations travel from the entries to a service that declared itself (or its link)
/// the problem. Branches that end nowhere are left out.
pub fn delegation_path(services: &[ServiceView], entries: &[String]) -> Vec<(String, String)> {
    let by_name: BTreeMap<&str, &ServiceView> = services.iter().map(|s| (s.name.as_str(), s)).collect();
    fn walk<'a>(
        name: &'a str,
        by_name: &BTreeMap<&'a str, &'a ServiceView>,
        seen: &mut BTreeSet<&'a str>,
        path: &mut Vec<(String, String)>,
    ) -> bool {
        let Some(service) = by_name.get(name) else { return false };
        if !seen.insert(name) {
            return false;
        }
        if is_culprit(&service.verdict) {
            // A slow link: the last hop is the link itself.
            if let Some(link) = service.detail.strip_prefix("link ")
                && let Some((from, to)) = link.split_once('>')
            {
                path.push((from.to_string(), to.to_string()));
            }
            return true;
        }
        if service.verdict != "delegated" {
            return false;
        }
        let mut reached = false;
        for callee in &service.delegated_to {
            let mark = path.len();
            if walk(callee, by_name, seen, path) {
                path.insert(mark, (name.to_string(), callee.clone()));
                reached = true;
            }
        }
        reached
    }
    let mut path = Vec::new();
    let mut seen = BTreeSet::new();
    for entry in entries {
        walk(entry, &by_name, &mut seen, &mut path);
    }
    path
}

fn headline(services: &[ServiceView], entries: &[String]) -> String {
    let culprits: Vec<String> = services
        .iter()
        .filter(|s| is_culprit(&s.verdict))
        .map(|s| match s.verdict.as_str() {
            "network" => format!("slow {} (seen by {})", s.detail, s.name),
            verdict => format!("{verdict}: {} {}", s.name, s.detail).trim_end().to_string(),
        })
        .collect();
    let entry = entries
        .iter()
        .filter_map(|name| services.iter().find(|s| &s.name == name))
        .map(|s| match s.target_ms {
            Some(target) => format!("{} at {:.0} ms / SLO {:.0} ms", s.name, s.latency_ms, target),
            None => format!("{} at {:.0} ms", s.name, s.latency_ms),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let entry = if entry.is_empty() { String::new() } else { format!(" — entry {entry}") };
    if culprits.is_empty() { format!("No bottleneck named{entry}") } else { format!("{}{entry}", culprits.join("; ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, verdict: &str, detail: &str, delegated_to: &[&str]) -> ServiceView {
        ServiceView {
            name: name.into(),
            verdict: verdict.into(),
            detail: detail.into(),
            delegated_to: delegated_to.iter().map(|s| s.to_string()).collect(),
            ..ServiceView::default()
        }
    }

    #[test]
    fn the_path_follows_delegations_to_the_root_cause_only() {
        let services = vec![
            service("web", "delegated", "", &["api", "auth"]),
            service("api", "delegated", "", &["db"]),
            service("auth", "delegated", "", &["ghost"]),
            service("db", "root-cause", "local", &[]),
        ];
        let path = delegation_path(&services, &["web".into()]);
        assert_eq!(path, vec![("web".into(), "api".into()), ("api".into(), "db".into())]);
        assert!(headline(&services, &["web".into()]).starts_with("root-cause: db local"));
    }

    #[test]
    fn a_slow_link_ends_the_path_on_the_link() {
        let services = vec![service("web", "delegated", "", &["api"]), service("api", "network", "link api>db", &[])];
        let path = delegation_path(&services, &["web".into()]);
        assert_eq!(path, vec![("web".into(), "api".into()), ("api".into(), "db".into())]);
    }

    #[test]
    fn loops_and_healthy_graphs_give_no_path() {
        let looped = vec![service("a", "delegated", "", &["b"]), service("b", "delegated", "", &["a"])];
        assert!(delegation_path(&looped, &["a".into()]).is_empty());
        let healthy = vec![service("a", "healthy", "", &[])];
        assert!(delegation_path(&healthy, &["a".into()]).is_empty());
        assert!(headline(&healthy, &[]).starts_with("No bottleneck"));
    }
}
