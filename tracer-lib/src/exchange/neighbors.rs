//! The neighbour table: the services this one called or was called by in recent windows, their agents (one per
//! replica), what they last said, and which agents stopped answering.
//!
//! Only this service's own windows add neighbours and agents (from the edges it measured); a report from a
//! service that is not a neighbour is answered but not tracked, so made-up senders cannot fill the table or tell
//! it anything. Bounded: at most `cap` neighbours and 8 agents each, and agents not seen on an edge for
//! [`EXPIRE_AFTER`] windows are dropped (a rollout replaces pod addresses).

use std::collections::BTreeMap;

use rootscale_proto::v1 as proto;

use crate::{aggregate::stats::AGENTS_PER_EDGE, exchange::report::ValidReport};

/// Windows after which an agent no edge mentioned is forgotten.
pub const EXPIRE_AFTER: u64 = 12;

/// One agent of a neighbour.
#[derive(Clone, Debug, Default)]
pub struct NeighborAgent {
    /// The last window in which one of our edges named it.
    pub last_seen: u64,
    /// It did not answer the last report sent to it.
    pub failed: bool,
    /// The window of its last report and the largest utilisation in its subtree then.
    pub subtree_utilization: Option<(u64, f64)>,
}

/// One neighbour service.
#[derive(Clone, Debug, Default)]
pub struct Neighbor {
    pub agents: BTreeMap<String, NeighborAgent>,
    /// The last window it sent us a report for, its decision and CPU utilisation then.
    pub last_window: Option<u64>,
    pub last_decision: Option<proto::Decision>,
    pub cpu_utilization: Option<f64>,
}

impl Neighbor {
    /// The largest utilisation in its subtree that any of its agents reported for a window from `since` on: one
    /// replica under pressure holds its callers' workers, however quiet a replica that just started is.
    pub fn subtree_utilization(&self, since: u64) -> Option<f64> {
        self.agents
            .values()
            .filter_map(|agent| agent.subtree_utilization)
            .filter(|(window_id, _)| *window_id >= since)
            .map(|(_, load)| load)
            .reduce(f64::max)
    }

    /// Stale: every agent we know of failed to answer the last report.
    pub fn stale(&self) -> bool {
        !self.agents.is_empty() && self.agents.values().all(|agent| agent.failed)
    }
}

/// Whether a report's sender is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heard {
    Known,
    UnknownService,
    /// The service is a neighbour, but no edge of ours named this agent for it.
    UnknownAgent,
}

/// All neighbours, by service name.
#[derive(Debug)]
pub struct Neighbors {
    cap: usize,
    by_service: BTreeMap<String, Neighbor>,
    /// Neighbours or agents refused because the table was full.
    pub refused: u64,
}

impl Neighbors {
    pub fn new(cap: usize) -> Self {
        Self { cap, by_service: BTreeMap::new(), refused: 0 }
    }

    /// One of our edges in `window_id` named `service`'s agent at `agent`.
    pub fn learn(&mut self, service: &str, agent: &str, window_id: u64) {
        if !self.by_service.contains_key(service) {
            if self.by_service.len() >= self.cap {
                self.refused += 1;
                return;
            }
            self.by_service.insert(service.to_string(), Neighbor::default());
        }
        let Some(neighbor) = self.by_service.get_mut(service) else { return };
        let room = neighbor.agents.len() < AGENTS_PER_EDGE;
        match neighbor.agents.get_mut(agent) {
            Some(known) => known.last_seen = known.last_seen.max(window_id),
            None if room => {
                neighbor.agents.insert(
                    agent.to_string(),
                    NeighborAgent { last_seen: window_id, failed: false, subtree_utilization: None },
                );
            }
            None => self.refused += 1,
        }
    }

    /// Forgets agents no edge named since `oldest_kept`, and neighbours left with none.
    pub fn expire(&mut self, oldest_kept: u64) {
        for neighbor in self.by_service.values_mut() {
            neighbor.agents.retain(|_, agent| agent.last_seen >= oldest_kept);
        }
        self.by_service.retain(|_, neighbor| !neighbor.agents.is_empty());
    }

    /// A report arrived. It is heard (the neighbour's decision and utilisation noted) only from an agent one of
    /// this service's own edges named for the service the report names.
    pub fn heard_from(&mut self, report: &ValidReport) -> Heard {
        let Some(neighbor) = self.by_service.get_mut(&report.from_service) else {
            return Heard::UnknownService;
        };
        let Some(agent) = neighbor.agents.get_mut(&report.from_agent) else {
            return Heard::UnknownAgent;
        };
        agent.failed = false;
        // Reports travel concurrently and may arrive out of order: an older window's never replaces a newer's.
        let newest = neighbor.last_window.is_none_or(|last| report.window_id >= last);
        if newest {
            neighbor.last_window = Some(report.window_id);
            if report.decision.is_some() {
                neighbor.last_decision = report.decision.clone();
            }
            if report.utilization.is_some() {
                neighbor.cpu_utilization = report.utilization;
            }
        }
        if let Some(load) = report.subtree_utilization {
            agent.subtree_utilization = match agent.subtree_utilization {
                Some((known, _)) if known > report.window_id => agent.subtree_utilization,
                // Within a window the pressure an agent reports only rises (news of a callee's, §1.7), so the
                // window's first report arriving after its news must not lower it.
                Some((known, earlier)) if known == report.window_id => Some((known, earlier.max(load))),
                _ => Some((report.window_id, load)),
            };
        }
        Heard::Known
    }

    /// The outcome of sending a report to `service`'s agent `agent` (only known agents are marked).
    pub fn sent(&mut self, service: &str, agent: &str, answered: bool) {
        if let Some(known) = self.by_service.get_mut(service).and_then(|n| n.agents.get_mut(agent)) {
            known.failed = !answered;
        }
    }

    pub fn get(&self, service: &str) -> Option<&Neighbor> {
        self.by_service.get(service)
    }

    pub fn is_stale(&self, service: &str) -> bool {
        self.by_service.get(service).is_some_and(Neighbor::stale)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Neighbor)> {
        self.by_service.iter()
    }

    pub fn len(&self) -> usize {
        self.by_service.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(service: &str, agent: &str, window_id: u64, utilization: Option<f64>) -> ValidReport {
        ValidReport {
            from_service: service.into(),
            from_agent: agent.into(),
            window_id,
            utilization,
            subtree_utilization: utilization,
            addressed_to: None,
            decision: None,
            delegation: None,
        }
    }

    #[test]
    fn a_neighbour_is_stale_when_every_agent_failed_and_fresh_again_when_heard_from() {
        let mut neighbors = Neighbors::new(2);
        neighbors.learn("b", "127.0.0.2:9797", 1);
        neighbors.learn("b", "127.0.0.3:9797", 1);
        neighbors.sent("b", "127.0.0.2:9797", false);
        assert!(!neighbors.is_stale("b"), "one replica still answers");
        neighbors.sent("b", "127.0.0.3:9797", false);
        neighbors.sent("b", "127.9.9.9:9797", true); // not a known agent: ignored
        assert!(neighbors.is_stale("b"));
        assert_eq!(neighbors.heard_from(&report("b", "127.0.0.3:9797", 5, Some(0.5))), Heard::Known);
        assert!(!neighbors.is_stale("b"));
        assert_eq!(neighbors.get("b").unwrap().cpu_utilization, Some(0.5));
    }

    #[test]
    fn the_table_is_bounded_and_strangers_are_not_tracked() {
        let mut neighbors = Neighbors::new(2);
        for service in ["a", "b", "c", "d"] {
            neighbors.learn(service, "127.0.0.2:9797", 1);
        }
        assert_eq!(neighbors.len(), 2);
        for i in 0..20 {
            neighbors.learn("a", &format!("127.0.0.{i}:9797"), 1);
        }
        assert_eq!(neighbors.get("a").unwrap().agents.len(), AGENTS_PER_EDGE);
        assert_eq!(neighbors.heard_from(&report("stranger", "127.0.0.9:9797", 1, Some(5.0))), Heard::UnknownService);
        assert!(neighbors.get("stranger").is_none());
        // A known name from an agent no edge named: not heard, nothing noted.
        assert_eq!(neighbors.heard_from(&report("a", "127.0.9.9:9797", 1, Some(5.0))), Heard::UnknownAgent);
        assert_eq!(neighbors.get("a").unwrap().cpu_utilization, None);
    }

    #[test]
    fn reports_arriving_out_of_order_never_lower_what_is_known() {
        let mut neighbors = Neighbors::new(4);
        neighbors.learn("b", "127.0.0.2:9797", 1);
        let b = |neighbors: &Neighbors| neighbors.get("b").unwrap().subtree_utilization(0);
        // Window 7's report, then its news (a callee's pressure), then window 7's first report arriving late.
        neighbors.heard_from(&report("b", "127.0.0.2:9797", 7, Some(0.6)));
        neighbors.heard_from(&report("b", "127.0.0.2:9797", 7, Some(2.8)));
        neighbors.heard_from(&report("b", "127.0.0.2:9797", 7, Some(0.6)));
        assert_eq!(b(&neighbors), Some(2.8));
        // An older window's report arriving after a newer one changes nothing: pressure, CPU or decision.
        let decided = |window_id, utilization, kind: &str| ValidReport {
            decision: Some(proto::Decision { kind: kind.into(), ..proto::Decision::default() }),
            ..report("b", "127.0.0.2:9797", window_id, Some(utilization))
        };
        neighbors.heard_from(&decided(8, 0.4, "cpu"));
        neighbors.heard_from(&decided(6, 3.0, "local"));
        assert_eq!(b(&neighbors), Some(0.4));
        assert_eq!(neighbors.get("b").unwrap().last_decision.as_ref().map(|d| d.kind.as_str()), Some("cpu"));
        assert_eq!(neighbors.get("b").unwrap().cpu_utilization, Some(0.4));
        assert_eq!(neighbors.get("b").unwrap().last_window, Some(8));
    }

    #[test]
    fn agents_no_edge_mentions_are_forgotten() {
        let mut neighbors = Neighbors::new(8);
        neighbors.learn("b", "127.0.0.2:9797", 1);
        neighbors.learn("b", "127.0.0.3:9797", 20);
        neighbors.learn("c", "127.0.0.4:9797", 2);
        neighbors.expire(10);
        assert_eq!(neighbors.get("b").unwrap().agents.keys().collect::<Vec<_>>(), ["127.0.0.3:9797"]);
        assert!(neighbors.get("c").is_none());
    }
}
