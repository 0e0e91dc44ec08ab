//! The neighbour table: every service this one exchanged reports with, its agents (one per replica), what it last
//! said, and whether it stopped answering. Bounded: at most `cap` neighbours and 8 agents each; more are refused
//! and counted.

use std::collections::{BTreeMap, BTreeSet};

use rootscale_proto::v1 as proto;

use crate::aggregate::stats::AGENTS_PER_EDGE;

/// One neighbour service.
#[derive(Clone, Debug, Default)]
pub struct Neighbor {
    /// Its agents, as learned from in-band headers and reports.
    pub agents: BTreeSet<String>,
    /// Agents that did not answer the last report sent to them.
    pub failed: BTreeSet<String>,
    /// The last window it sent us a report for, and its decision then.
    pub last_window: Option<u64>,
    pub last_decision: Option<proto::Decision>,
    /// Its utilisation in that window.
    pub utilization: Option<f64>,
}

impl Neighbor {
    /// Stale: every agent we know of failed to answer the last report.
    pub fn stale(&self) -> bool {
        !self.agents.is_empty() && self.agents.iter().all(|agent| self.failed.contains(agent))
    }
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

    /// The entry for `service`, created if there is room.
    fn entry(&mut self, service: &str) -> Option<&mut Neighbor> {
        if !self.by_service.contains_key(service) {
            if self.by_service.len() >= self.cap {
                self.refused += 1;
                return None;
            }
            self.by_service.insert(service.to_string(), Neighbor::default());
        }
        self.by_service.get_mut(service)
    }

    /// Learns that `service` has an agent at `agent`.
    pub fn learn(&mut self, service: &str, agent: &str) {
        let Some(neighbor) = self.entry(service) else { return };
        if neighbor.agents.len() < AGENTS_PER_EDGE || neighbor.agents.contains(agent) {
            neighbor.agents.insert(agent.to_string());
        } else {
            self.refused += 1;
        }
    }

    /// A report arrived from `service`'s agent `agent`: it is alive.
    pub fn heard_from(
        &mut self,
        service: &str,
        agent: &str,
        window_id: u64,
        decision: Option<proto::Decision>,
        utilization: Option<f64>,
    ) {
        self.learn(service, agent);
        if let Some(neighbor) = self.by_service.get_mut(service) {
            neighbor.failed.remove(agent);
            neighbor.last_window = Some(neighbor.last_window.map_or(window_id, |w| w.max(window_id)));
            if decision.is_some() {
                neighbor.last_decision = decision;
            }
            if utilization.is_some() {
                neighbor.utilization = utilization;
            }
        }
    }

    /// The outcome of sending a report to `service`'s agent `agent`.
    pub fn sent(&mut self, service: &str, agent: &str, answered: bool) {
        if let Some(neighbor) = self.by_service.get_mut(service) {
            if answered {
                neighbor.failed.remove(agent);
            } else {
                neighbor.failed.insert(agent.to_string());
            }
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

    #[test]
    fn a_neighbour_is_stale_when_every_agent_failed_and_fresh_again_when_heard_from() {
        let mut neighbors = Neighbors::new(2);
        neighbors.learn("b", "10.0.0.2:9797");
        neighbors.learn("b", "10.0.0.3:9797");
        neighbors.sent("b", "10.0.0.2:9797", false);
        assert!(!neighbors.is_stale("b"), "one replica still answers");
        neighbors.sent("b", "10.0.0.3:9797", false);
        assert!(neighbors.is_stale("b"));
        neighbors.heard_from("b", "10.0.0.3:9797", 5, None, Some(0.5));
        assert!(!neighbors.is_stale("b"));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut neighbors = Neighbors::new(2);
        for service in ["a", "b", "c", "d"] {
            neighbors.learn(service, "10.0.0.2:9797");
        }
        assert_eq!(neighbors.len(), 2);
        assert_eq!(neighbors.refused, 2);
        for i in 0..20 {
            neighbors.learn("a", &format!("10.0.0.{i}:9797"));
        }
        assert_eq!(neighbors.get("a").unwrap().agents.len(), AGENTS_PER_EDGE);
    }
}
