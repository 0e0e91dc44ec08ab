//! What an agent sends after deciding a window: one report to each agent of each neighbour on an edge with
//! traffic (and a report without an edge to the callers beyond the edge cap), and with the reports to the callees
//! its decision names, the delegation — passed on with the path it came down.

use std::sync::Arc;

use rootscale_proto::v1 as proto;

use crate::{
    aggregate::WindowStats,
    decide::{Decision, Delegated, recommend::Utilization},
    exchange::report::{self, ReportHead},
};

/// One report to send.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The neighbour service and the agent it goes to.
    pub service: String,
    pub agent: String,
    pub report: proto::NeighborReport,
}

/// Reports to send.
pub type Outbox = Vec<Outgoing>;

/// Who is sending, about which window.
pub struct Sender<'a> {
    pub service: &'a str,
    pub agent: &'a str,
    pub window_ms: u64,
    /// The window's load.
    pub load: Utilization,
    /// The largest utilisation its callees' last reports gave for their subtrees.
    pub callees_utilization: f64,
}

/// Who a decided window's reports go to.
#[derive(Clone, Copy, Debug)]
pub enum Recipients<'a> {
    /// Every agent of every neighbour on an edge with traffic: the reports of a window just decided.
    All,
    /// Only these callees: a delegation that arrived after the window was decided, passed on to the callees it
    /// newly points at.
    Callees(&'a [Arc<str>]),
    /// Only the callers: news from a callee (pressure in its subtree) that changes what this service reports up.
    Callers,
}

/// The reports for a decided window. `received` is the first delegation this service got for the window (its
/// path is extended, not restarted).
pub fn reports(
    from: &Sender<'_>,
    stats: &WindowStats,
    decision: &Decision,
    received: Option<&Delegated>,
    to: Recipients<'_>,
) -> Outbox {
    let wire_decision = decision.to_proto();
    let summary = report::summary(stats, from.load.cpu, from.load.max().max(from.callees_utilization));
    let head = ReportHead {
        service: from.service,
        agent: from.agent,
        window_id: stats.window_id,
        window_ms: from.window_ms,
        summary: &summary,
        decision: &wire_decision,
    };
    // Demand held back on the way here: this service's arrivals over completions, or more upstream.
    let own_unserved = stats.arrivals as f64 / stats.requests.max(1) as f64;
    let unserved_ratio = own_unserved.max(received.map_or(1.0, |d| d.unserved_ratio));
    let mut path: Vec<String> = received.map(|d| d.path.clone()).unwrap_or_default();
    path.push(from.service.to_string());
    // A full path means a loop or an absurd depth: stop passing the question on.
    let may_delegate = path.len() <= report::MAX_DELEGATION_PATH;
    let mut outbox = Vec::new();
    for (callee, edge) in &stats.outbound {
        let wanted = match to {
            Recipients::All => true,
            Recipients::Callees(only) => only.contains(callee),
            Recipients::Callers => false,
        };
        if !wanted {
            continue;
        }
        let delegated = may_delegate && decision.delegated_to.contains(callee);
        let delegation = delegated.then(|| {
            let remote_wait_us = edge.remote_wait.percentile_us(decision.percentile).unwrap_or(0);
            report::delegation(decision, &path, remote_wait_us, unserved_ratio)
        });
        for agent in &edge.callee_agents {
            outbox.push(Outgoing {
                service: callee.to_string(),
                agent: agent.to_string(),
                report: head.to_callee(callee, edge, delegation.clone()),
            });
        }
    }
    if matches!(to, Recipients::All | Recipients::Callers) {
        for (caller, edge) in &stats.inbound {
            for agent in &edge.caller_agents {
                outbox.push(Outgoing {
                    service: caller.to_string(),
                    agent: agent.to_string(),
                    report: head.to_caller(caller, edge),
                });
            }
        }
        // Callers beyond the edge cap: one report, without an edge, for all of them.
        if !stats.callers_beyond_cap.is_empty() {
            let report = head.to_caller_beyond_cap();
            for (caller, agents) in &stats.callers_beyond_cap {
                for agent in agents {
                    outbox.push(Outgoing {
                        service: caller.to_string(),
                        agent: agent.to_string(),
                        report: report.clone(),
                    });
                }
            }
        }
    }
    outbox
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::stats::InboundStats;

    #[test]
    fn callers_beyond_the_edge_cap_are_told_without_an_edge() {
        let mut stats = WindowStats::new(9);
        stats.inbound.insert(
            "kept".into(),
            InboundStats { caller_agents: vec!["127.0.0.2:9797".into()], requests: 40, ..InboundStats::default() },
        );
        stats.callers_beyond_cap.insert("beyond".into(), vec!["127.0.0.3:9797".into(), "127.0.0.4:9797".into()]);
        let from = Sender {
            service: "shared",
            agent: "127.0.0.1:9797",
            window_ms: 1000,
            load: Utilization { pool: 2.5, ..Utilization::default() },
            callees_utilization: 0.0,
        };
        let decision = Decision::no_data("test");
        let sent = |to| -> Vec<(String, String, bool, f64)> {
            let mut sent: Vec<_> = reports(&from, &stats, &decision, None, to)
                .into_iter()
                .map(|out| {
                    let pressure = out.report.summary.map_or(0.0, |summary| summary.subtree_utilization);
                    (out.service, out.agent, out.report.edge.is_some(), pressure)
                })
                .collect();
            sent.sort_by(|a, b| a.1.cmp(&b.1));
            sent
        };
        let expected = vec![
            ("kept".to_string(), "127.0.0.2:9797".to_string(), true, 2.5),
            ("beyond".to_string(), "127.0.0.3:9797".to_string(), false, 2.5),
            ("beyond".to_string(), "127.0.0.4:9797".to_string(), false, 2.5),
        ];
        assert_eq!(sent(Recipients::All), expected);
        assert_eq!(sent(Recipients::Callers), expected);
        assert!(sent(Recipients::Callees(&[])).is_empty());
        // An edge-less report is valid.
        let report = reports(&from, &stats, &decision, None, Recipients::Callers).pop().unwrap().report;
        assert!(report.edge.is_none());
        assert!(crate::exchange::report::validate(&report, 1000).is_ok());
    }
}
