//! What an agent receives: reports from its neighbours, and the delegations some of them carry.
//!
//! A report counts only when its sender is an agent this service saw on one of its own edges, for the service the
//! report names — with a mesh key, an edge is only named after a verified header, so a stranger cannot speak for a
//! service by using its name. A report can arrive before this service has closed the same window (and so before
//! it has learned a new neighbour's agent): it is held until that window closes, then taken or refused.

use std::collections::{BTreeMap, VecDeque};

use crate::{
    decide::Delegated,
    exchange::{
        neighbors::{Heard, Neighbors},
        report::ValidReport,
    },
};

/// Windows a delegation is kept for (and how old a report may be).
pub const DELEGATION_WINDOWS: u64 = 3;
/// Delegations kept per window.
const MAX_DELEGATIONS: usize = 64;
/// Reports held for a window not closed here yet.
const MAX_HELD: usize = 256;

/// Why a report was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// For a window too old or too far ahead.
    StaleWindow,
    /// From a service that is not a neighbour.
    NotANeighbor,
    /// From an agent this service never saw for the service it names.
    UnverifiedAgent,
    /// For a window this service decided already, too late to act on.
    TooLate,
    /// Too many reports held already.
    Full,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::StaleWindow => "stale_window",
            Refusal::NotANeighbor => "not_a_neighbor",
            Refusal::UnverifiedAgent => "unverified_agent",
            Refusal::TooLate => "too_late",
            Refusal::Full => "full",
        }
    }
}

/// What became of a received report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// Taken: the neighbour's decision and utilisation are noted (a delegation for a later window waits for it).
    Taken,
    /// Taken, with a delegation for the window already decided here: decide it again.
    Redecide,
    /// Held until this service closes the report's window.
    Held,
    Refused(Refusal),
}

/// The delegations received, by window, and the reports held for windows not closed here yet.
#[derive(Debug, Default)]
pub struct Inbox {
    delegations: BTreeMap<u64, Vec<Delegated>>,
    held: VecDeque<ValidReport>,
}

impl Inbox {
    /// The delegations received for `window_id`.
    pub fn delegations(&self, window_id: u64) -> &[Delegated] {
        self.delegations.get(&window_id).map_or(&[], Vec::as_slice)
    }

    /// Takes a report for `service`. `now_window` is this agent's clock, `decided` the last window it decided.
    pub fn receive(
        &mut self,
        service: &str,
        neighbors: &mut Neighbors,
        report: ValidReport,
        now_window: u64,
        decided: Option<u64>,
    ) -> Received {
        let closed_here = decided.is_some_and(|decided| decided >= report.window_id);
        self.take(service, neighbors, report, now_window, decided, !closed_here)
    }

    /// Takes a report; with `may_hold`, one from an unknown sender is held rather than refused.
    fn take(
        &mut self,
        service: &str,
        neighbors: &mut Neighbors,
        report: ValidReport,
        now_window: u64,
        decided: Option<u64>,
        may_hold: bool,
    ) -> Received {
        // Window ids are untrusted: compare without overflowing.
        if report.window_id.saturating_add(DELEGATION_WINDOWS) < now_window
            || report.window_id > now_window.saturating_add(1)
        {
            return Received::Refused(Refusal::StaleWindow);
        }
        match neighbors.heard_from(&report) {
            Heard::Known => {}
            Heard::UnknownService | Heard::UnknownAgent if may_hold => {
                if self.held.len() >= MAX_HELD {
                    return Received::Refused(Refusal::Full);
                }
                self.held.push_back(report);
                return Received::Held;
            }
            Heard::UnknownService => return Received::Refused(Refusal::NotANeighbor),
            Heard::UnknownAgent => return Received::Refused(Refusal::UnverifiedAgent),
        }
        // A delegation counts only when the report is about the edge from its sender to this service.
        let Some(delegation) = report.delegation.filter(|_| report.addressed_to.as_deref() == Some(service)) else {
            return Received::Taken;
        };
        if delegation.path.iter().any(|hop| hop == service) {
            // A loop in the call graph: this service already passed the question on.
            return Received::Taken;
        }
        let decided = decided.unwrap_or(0);
        if report.window_id < decided {
            return Received::Refused(Refusal::TooLate);
        }
        let entry = self.delegations.entry(report.window_id).or_default();
        if entry.len() >= MAX_DELEGATIONS || entry.iter().any(|known| known.from == delegation.from) {
            return Received::Taken;
        }
        entry.push(delegation);
        if report.window_id == decided { Received::Redecide } else { Received::Taken }
    }

    /// This service closed `window_id` (and learned the agents on its edges): the reports held for it and
    /// earlier windows are taken or refused now, and delegations too old to matter are dropped. Returns what
    /// became of each held report.
    pub fn window_closed(&mut self, service: &str, neighbors: &mut Neighbors, window_id: u64) -> Vec<Received> {
        let oldest_kept = window_id.saturating_sub(DELEGATION_WINDOWS);
        self.delegations.retain(|id, _| *id >= oldest_kept);
        let (due, later): (VecDeque<_>, VecDeque<_>) =
            std::mem::take(&mut self.held).into_iter().partition(|report| report.window_id <= window_id);
        self.held = later;
        // Not decided yet: the caller decides `window_id` after this, with what was taken here.
        let decided = window_id.checked_sub(1);
        due.into_iter().map(|report| self.take(service, neighbors, report, window_id, decided, false)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(from_agent: &str, window_id: u64, delegate: bool) -> ValidReport {
        ValidReport {
            from_service: "web".into(),
            from_agent: from_agent.into(),
            window_id,
            utilization: None,
            subtree_utilization: None,
            addressed_to: Some("db".into()),
            decision: None,
            delegation: delegate.then(|| Delegated {
                from: "web".into(),
                percentile: 95.0,
                path: vec!["web".into()],
                unserved_ratio: 1.0,
            }),
        }
    }

    #[test]
    fn a_report_from_an_agent_never_seen_for_that_name_is_refused() {
        let mut neighbors = Neighbors::new(8);
        neighbors.learn("web", "127.0.0.1:9001", 10);
        let mut inbox = Inbox::default();
        let forged = report("127.0.0.1:6666", 10, true);
        assert_eq!(
            inbox.receive("db", &mut neighbors, forged, 10, Some(10)),
            Received::Refused(Refusal::UnverifiedAgent)
        );
        assert!(inbox.delegations(10).is_empty());
        let real = report("127.0.0.1:9001", 10, true);
        assert_eq!(inbox.receive("db", &mut neighbors, real, 10, Some(10)), Received::Redecide);
        assert_eq!(inbox.delegations(10).len(), 1);
    }

    #[test]
    fn a_report_that_beats_the_window_close_is_held_until_then() {
        let mut neighbors = Neighbors::new(8);
        let mut inbox = Inbox::default();
        // Window 11 is not closed here yet, and the caller's agent not learned yet.
        let early = report("127.0.0.1:9001", 11, true);
        assert_eq!(inbox.receive("db", &mut neighbors, early, 11, Some(10)), Received::Held);
        let stranger = report("127.0.0.1:6666", 11, true);
        assert_eq!(inbox.receive("db", &mut neighbors, stranger, 11, Some(10)), Received::Held);
        // Window 11 closes: the caller's agent is learned from this service's own edge.
        neighbors.learn("web", "127.0.0.1:9001", 11);
        let outcomes = inbox.window_closed("db", &mut neighbors, 11);
        assert_eq!(outcomes, [Received::Taken, Received::Refused(Refusal::UnverifiedAgent)]);
        assert_eq!(inbox.delegations(11).len(), 1, "used when window 11 is decided");
    }

    #[test]
    fn stale_and_late_reports_change_nothing() {
        let mut neighbors = Neighbors::new(8);
        neighbors.learn("web", "127.0.0.1:9001", 10);
        let mut inbox = Inbox::default();
        let old = report("127.0.0.1:9001", 2, true);
        assert_eq!(inbox.receive("db", &mut neighbors, old, 10, Some(10)), Received::Refused(Refusal::StaleWindow));
        let late = report("127.0.0.1:9001", 9, true);
        assert_eq!(inbox.receive("db", &mut neighbors, late, 10, Some(10)), Received::Refused(Refusal::TooLate));
        assert!(inbox.delegations(9).is_empty());
    }
}
