//! Reports between neighbours: built from a closed window, and checked strictly when received. A report that
//! fails a check is refused whole (`InvalidArgument`) and changes nothing.

use rootscale_proto::{REPORT_VERSION, v1 as proto};

use crate::{
    aggregate::{
        WindowStats,
        histogram::Histogram,
        stats::{AGENTS_PER_EDGE, InboundStats, OutboundStats},
    },
    decide::{Decision, Delegated},
    measure::{
        headers::{MAX_DURATION_US, valid_agent_addr, valid_service_name},
        sample::MAX_SAMPLE_EVERY,
    },
};

/// Largest encoded report accepted.
pub const MAX_REPORT_BYTES: usize = 16 * 1024;
/// Longest delegation path accepted (services it passed through).
pub const MAX_DELEGATION_PATH: usize = 32;
/// The most demand a delegation may say was held back upstream (arrivals over completions).
pub const MAX_UNSERVED_RATIO: f64 = 10.0;
/// Most compared waits, delegated callees or wait points in one report.
const MAX_LIST: usize = 64;
/// Longest free-text reason accepted.
const MAX_REASON: usize = 1024;
/// More requests than this in one window of one service is absurd (200,000 per second for 5 s).
const MAX_COUNT: u64 = 1_000_000_000;

/// Why a received report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid report: {0}")]
pub struct ReportError(pub String);

fn invalid(message: impl Into<String>) -> ReportError {
    ReportError(message.into())
}

fn quantiles(histogram: &Histogram) -> proto::Quantiles {
    proto::Quantiles {
        p50_us: histogram.percentile_us(50.0).unwrap_or(0),
        p95_us: histogram.percentile_us(95.0).unwrap_or(0),
        p99_us: histogram.percentile_us(99.0).unwrap_or(0),
    }
}

/// A service's own waits, as a few quantiles, its CPU utilisation and its subtree's.
pub fn summary(stats: &WindowStats, cpu_utilization: f64, subtree_utilization: f64) -> proto::WaitSummary {
    proto::WaitSummary {
        cpu_utilization,
        subtree_utilization,
        requests: stats.requests,
        errors: stats.errors,
        arrivals: stats.arrivals,
        total: Some(quantiles(&stats.total)),
        local_wait: Some(quantiles(&stats.local_wait)),
        busy: Some(quantiles(&stats.busy)),
        cpu_wait: Some(quantiles(&stats.cpu_wait)),
    }
}

/// Everything a report carries besides the edge.
pub struct ReportHead<'a> {
    pub service: &'a str,
    pub agent: &'a str,
    pub window_id: u64,
    pub window_ms: u64,
    pub summary: &'a proto::WaitSummary,
    pub decision: &'a proto::Decision,
}

impl ReportHead<'_> {
    fn report(&self, edge: Option<proto::EdgeView>, delegation: Option<proto::Delegation>) -> proto::NeighborReport {
        proto::NeighborReport {
            version: REPORT_VERSION,
            from_service: self.service.to_string(),
            from_agent: self.agent.to_string(),
            window_id: self.window_id,
            window_ms: u32::try_from(self.window_ms).unwrap_or(u32::MAX),
            edge,
            summary: Some(*self.summary),
            decision: Some(self.decision.clone()),
            delegation,
        }
    }

    /// The report to a caller: the callee's side of the edge (requests and their total, without histograms of
    /// anything the caller measures itself).
    pub fn to_caller(&self, caller: &str, edge: &InboundStats) -> proto::NeighborReport {
        let edge = proto::EdgeView {
            as_caller: None,
            as_callee: Some(proto::InboundEdge {
                caller: caller.to_string(),
                caller_agents: Vec::new(),
                requests: edge.requests,
                total: Some(edge.total.to_proto()),
            }),
        };
        self.report(Some(edge), None)
    }

    /// The report to a caller beyond the sender's edge cap: no edge (none was measured), the summary and the
    /// decision only — what a caller needs to know of its callee's pressure.
    pub fn to_caller_beyond_cap(&self) -> proto::NeighborReport {
        self.report(None, None)
    }

    /// The report to a callee: the caller's side of the edge, and a delegation if the caller suspects the
    /// callee's subtree.
    pub fn to_callee(
        &self,
        callee: &str,
        edge: &OutboundStats,
        delegation: Option<proto::Delegation>,
    ) -> proto::NeighborReport {
        let edge = proto::EdgeView {
            as_caller: Some(proto::OutboundEdge {
                callee: callee.to_string(),
                callee_agents: Vec::new(),
                calls: edge.calls,
                errors: edge.errors,
                untimed: edge.untimed,
                critical: edge.critical,
                client_total: Some(edge.client_total.to_proto()),
                remote_total: None,
                net_wait: Some(edge.net_wait.to_proto()),
                remote_wait: Some(edge.remote_wait.to_proto()),
                remote_wait_at: Vec::new(),
            }),
            as_callee: None,
        };
        self.report(Some(edge), delegation)
    }
}

/// What the receiver keeps of a valid report.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidReport {
    pub from_service: String,
    pub from_agent: String,
    pub window_id: u64,
    /// The sender's CPU utilisation over that window.
    pub utilization: Option<f64>,
    /// The largest utilisation in the sender's subtree over that window.
    pub subtree_utilization: Option<f64>,
    /// For a report from a caller: the callee the edge is about (should be the receiver).
    pub addressed_to: Option<String>,
    pub decision: Option<proto::Decision>,
    pub delegation: Option<Delegated>,
}

fn check_name(name: &str, what: &str) -> Result<(), ReportError> {
    if valid_service_name(name) { Ok(()) } else { Err(invalid(format!("{what} {name:?} is not a valid service name"))) }
}

fn check_us(value: u64, what: &str) -> Result<(), ReportError> {
    if value <= MAX_DURATION_US { Ok(()) } else { Err(invalid(format!("{what} {value} µs is absurd"))) }
}

fn check_count(value: u64, what: &str) -> Result<(), ReportError> {
    if value <= MAX_COUNT { Ok(()) } else { Err(invalid(format!("{what} {value} is absurd"))) }
}

fn check_percentile(value: f64, what: &str) -> Result<(), ReportError> {
    if value.is_finite() && value > 0.0 && value <= 100.0 {
        Ok(())
    } else {
        Err(invalid(format!("{what} {value} is not a percentile in (0, 100]")))
    }
}

fn check_histogram(histogram: Option<&proto::Histogram>, what: &str) -> Result<(), ReportError> {
    if let Some(histogram) = histogram {
        let parsed = Histogram::from_proto(histogram).map_err(|error| invalid(format!("{what}: {error}")))?;
        check_count(parsed.count(), what)?;
        check_us(parsed.max_us(), what)?;
    }
    Ok(())
}

fn check_agents(agents: &[String], what: &str) -> Result<(), ReportError> {
    if agents.len() > AGENTS_PER_EDGE {
        return Err(invalid(format!("{what}: more than {AGENTS_PER_EDGE} agents")));
    }
    match agents.iter().find(|agent| !valid_agent_addr(agent)) {
        Some(bad) => Err(invalid(format!("{what}: agent address {bad:?} is not host:port"))),
        None => Ok(()),
    }
}

fn check_wait_point(point: Option<&proto::WaitPoint>, what: &str) -> Result<(), ReportError> {
    let Some(point) = point else { return Ok(()) };
    check_name(&point.service, what)?;
    match proto::WaitKind::try_from(point.kind) {
        Ok(proto::WaitKind::Local) if point.from_service.is_empty() => Ok(()),
        Ok(proto::WaitKind::Net) => check_name(&point.from_service, what),
        _ => Err(invalid(format!("{what}: bad wait kind {} or stray from_service", point.kind))),
    }
}

fn check_summary(summary: &proto::WaitSummary) -> Result<(), ReportError> {
    if !(summary.cpu_utilization.is_finite() && (0.0..=1000.0).contains(&summary.cpu_utilization)) {
        return Err(invalid(format!("summary.cpu_utilization {} is not a utilisation", summary.cpu_utilization)));
    }
    if !(summary.subtree_utilization.is_finite() && (0.0..=1000.0).contains(&summary.subtree_utilization)) {
        return Err(invalid(format!(
            "summary.subtree_utilization {} is not a utilisation",
            summary.subtree_utilization
        )));
    }
    check_count(summary.requests, "summary.requests")?;
    check_count(summary.errors, "summary.errors")?;
    check_count(summary.arrivals, "summary.arrivals")?;
    for (quantiles, what) in [
        (&summary.total, "summary.total"),
        (&summary.local_wait, "summary.local_wait"),
        (&summary.busy, "summary.busy"),
        (&summary.cpu_wait, "summary.cpu_wait"),
    ] {
        if let Some(q) = quantiles {
            check_us(q.p99_us, what)?;
            if q.p50_us > q.p95_us || q.p95_us > q.p99_us {
                return Err(invalid(format!("{what}: quantiles out of order")));
            }
        }
    }
    Ok(())
}

fn check_decision(decision: &proto::Decision) -> Result<(), ReportError> {
    proto::Verdict::try_from(decision.verdict).map_err(|_| invalid(format!("unknown verdict {}", decision.verdict)))?;
    if decision.kind.len() > 16 {
        return Err(invalid("decision.kind is too long"));
    }
    check_wait_point(decision.bottleneck.as_ref(), "decision.bottleneck")?;
    if decision.delegated_to.len() > MAX_LIST {
        return Err(invalid("decision.delegated_to is too long"));
    }
    for callee in &decision.delegated_to {
        check_name(callee, "decision.delegated_to")?;
    }
    if let Some(evidence) = &decision.evidence {
        check_percentile(evidence.percentile, "evidence.percentile")?;
        check_us(evidence.observed_total_us, "evidence.observed_total_us")?;
        check_us(evidence.slo_us, "evidence.slo_us")?;
        check_count(evidence.requests, "evidence.requests")?;
        if evidence.compared.len() > MAX_LIST || evidence.reason.len() > MAX_REASON {
            return Err(invalid("evidence is too long"));
        }
        for compared in &evidence.compared {
            check_wait_point(compared.point.as_ref(), "evidence.compared")?;
            check_us(compared.value_us, "evidence.compared")?;
            if !compared.via_callee.is_empty() {
                check_name(&compared.via_callee, "evidence.compared.via_callee")?;
            }
        }
        if evidence.sample_every > MAX_SAMPLE_EVERY {
            return Err(invalid(format!(
                "evidence.sample_every {} is above {MAX_SAMPLE_EVERY}",
                evidence.sample_every
            )));
        }
        if let Some(estimate) = &evidence.local_wait_estimate {
            check_count(estimate.untied_calls, "evidence.local_wait_estimate.untied_calls")?;
            if !(0.0..=1.0).contains(&estimate.untied_share) {
                return Err(invalid(format!(
                    "evidence.local_wait_estimate.untied_share {} is not a fraction",
                    estimate.untied_share
                )));
            }
        }
    }
    Ok(())
}

/// Checks a received report against this agent's window length; returns what is worth keeping.
pub fn validate(report: &proto::NeighborReport, window_ms: u64) -> Result<ValidReport, ReportError> {
    use prost::Message as _;
    if report.version != REPORT_VERSION {
        return Err(invalid(format!("version {} (this agent speaks {REPORT_VERSION})", report.version)));
    }
    if report.encoded_len() > MAX_REPORT_BYTES {
        return Err(invalid(format!("{} bytes, more than {MAX_REPORT_BYTES}", report.encoded_len())));
    }
    check_name(&report.from_service, "from_service")?;
    if !valid_agent_addr(&report.from_agent) {
        return Err(invalid(format!("from_agent {:?} is not host:port", report.from_agent)));
    }
    if u64::from(report.window_ms) != window_ms {
        return Err(invalid(format!("window of {} ms, this agent uses {window_ms} ms", report.window_ms)));
    }
    if let Some(edge) = &report.edge {
        if let Some(outbound) = &edge.as_caller {
            check_name(&outbound.callee, "edge.callee")?;
            check_agents(&outbound.callee_agents, "edge.callee_agents")?;
            for count in [outbound.calls, outbound.errors, outbound.untimed, outbound.critical] {
                check_count(count, "edge counts")?;
            }
            for (histogram, what) in [
                (&outbound.client_total, "edge.client_total"),
                (&outbound.remote_total, "edge.remote_total"),
                (&outbound.net_wait, "edge.net_wait"),
                (&outbound.remote_wait, "edge.remote_wait"),
            ] {
                check_histogram(histogram.as_ref(), what)?;
            }
            if outbound.remote_wait_at.len() > MAX_LIST {
                return Err(invalid("edge.remote_wait_at is too long"));
            }
            for at in &outbound.remote_wait_at {
                check_wait_point(at.point.as_ref(), "edge.remote_wait_at")?;
                check_us(at.max_us, "edge.remote_wait_at")?;
            }
        }
        if let Some(inbound) = &edge.as_callee {
            check_name(&inbound.caller, "edge.caller")?;
            check_agents(&inbound.caller_agents, "edge.caller_agents")?;
            check_count(inbound.requests, "edge.requests")?;
            check_histogram(inbound.total.as_ref(), "edge.total")?;
        }
    }
    if let Some(summary) = &report.summary {
        check_summary(summary)?;
    }
    if let Some(decision) = &report.decision {
        check_decision(decision)?;
    }
    let delegation = match &report.delegation {
        None => None,
        Some(delegation) => {
            check_percentile(delegation.percentile, "delegation.percentile")?;
            check_us(delegation.caller_total_us, "delegation.caller_total_us")?;
            check_us(delegation.caller_slo_us, "delegation.caller_slo_us")?;
            check_us(delegation.remote_wait_us, "delegation.remote_wait_us")?;
            if delegation.path.len() > MAX_DELEGATION_PATH {
                return Err(invalid(format!("delegation path longer than {MAX_DELEGATION_PATH}")));
            }
            for service in &delegation.path {
                check_name(service, "delegation.path")?;
            }
            let unserved_ratio = match delegation.unserved_ratio {
                0.0 => 1.0,
                ratio if ratio.is_finite() && (1.0..=MAX_UNSERVED_RATIO).contains(&ratio) => ratio,
                ratio => {
                    return Err(invalid(format!(
                        "delegation.unserved_ratio {ratio} is not in [1, {MAX_UNSERVED_RATIO}]"
                    )));
                }
            };
            Some(Delegated {
                from: report.from_service.clone(),
                percentile: delegation.percentile,
                path: delegation.path.clone(),
                unserved_ratio,
            })
        }
    };
    Ok(ValidReport {
        from_service: report.from_service.clone(),
        from_agent: report.from_agent.clone(),
        window_id: report.window_id,
        utilization: report.summary.as_ref().map(|summary| summary.cpu_utilization),
        subtree_utilization: report.summary.as_ref().map(|summary| summary.subtree_utilization),
        addressed_to: report.edge.as_ref().and_then(|edge| edge.as_caller.as_ref()).map(|edge| edge.callee.clone()),
        decision: report.decision.clone(),
        delegation,
    })
}

/// The delegation a caller sends a callee it suspects.
pub fn delegation(decision: &Decision, path: &[String], remote_wait_us: u64, unserved_ratio: f64) -> proto::Delegation {
    proto::Delegation {
        unserved_ratio: unserved_ratio.clamp(1.0, MAX_UNSERVED_RATIO),
        percentile: decision.percentile,
        caller_total_us: decision.observed_total_us,
        caller_slo_us: decision.slo_us.unwrap_or(0),
        remote_wait_us,
        path: path.iter().take(MAX_DELEGATION_PATH).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> proto::NeighborReport {
        let mut histogram = Histogram::new();
        histogram.record(1200);
        let summary = proto::WaitSummary::default();
        let decision = Decision::no_data("test").to_proto();
        let head = ReportHead {
            service: "svc-a",
            agent: "10.0.0.1:9797",
            window_id: 7,
            window_ms: 5000,
            summary: &summary,
            decision: &decision,
        };
        let edge = OutboundStats {
            calls: 1,
            client_total: histogram.clone(),
            net_wait: histogram.clone(),
            remote_wait: histogram,
            ..OutboundStats::default()
        };
        let mut report = head.to_callee("svc-b", &edge, None);
        report.delegation =
            Some(proto::Delegation { percentile: 95.0, path: vec!["svc-a".into()], ..Default::default() });
        report
    }

    #[test]
    fn a_good_report_passes() {
        let valid = validate(&good(), 5000).unwrap();
        assert_eq!(valid.from_service, "svc-a");
        assert_eq!(valid.delegation.unwrap().path, vec!["svc-a".to_string()]);
    }

    #[test]
    fn a_report_from_the_busiest_allowed_window_passes_its_receiver() {
        use crate::{decide::policy::Compared, measure::record::WaitPoint};
        let mut decision = Decision::no_data(&"a very long reason ".repeat(200));
        decision.compared = (0..129)
            .map(|i| Compared {
                point: WaitPoint::Local { service: format!("callee-{i:03}-{}", "x".repeat(50)).into() },
                us: 1000,
                via: Some(format!("callee-{i:03}").into()),
            })
            .collect();
        let summary = proto::WaitSummary::default();
        let decision = decision.to_proto();
        let head = ReportHead {
            service: "svc-a",
            agent: "10.0.0.1:9797",
            window_id: 7,
            window_ms: 5000,
            summary: &summary,
            decision: &decision,
        };
        let report = head.to_callee("svc-b", &OutboundStats::default(), None);
        validate(&report, 5000).expect("an agent's own report passes another agent's checks");
    }

    #[test]
    fn bad_reports_are_refused_with_a_reason() {
        type Break = fn(&mut proto::NeighborReport);
        let cases: Vec<(&str, Break)> = vec![
            ("version", |r| r.version = 2),
            ("from_service", |r| r.from_service = "bad name".into()),
            ("from_agent", |r| r.from_agent = "nowhere".into()),
            ("window of", |r| r.window_ms = 1000),
            ("delegation.percentile", |r| r.delegation.as_mut().unwrap().percentile = f64::NAN),
            ("delegation.percentile", |r| r.delegation.as_mut().unwrap().percentile = -5.0),
            ("delegation.caller_total_us", |r| r.delegation.as_mut().unwrap().caller_total_us = u64::MAX),
            ("delegation path", |r| r.delegation.as_mut().unwrap().path = vec!["x".into(); 40]),
            ("edge.net_wait", |r| {
                r.edge.as_mut().unwrap().as_caller.as_mut().unwrap().net_wait.as_mut().unwrap().count = 9
            }),
            ("edge counts", |r| r.edge.as_mut().unwrap().as_caller.as_mut().unwrap().calls = u64::MAX),
            ("unknown verdict", |r| r.decision.as_mut().unwrap().verdict = 42),
            ("bytes", |r| r.decision.as_mut().unwrap().evidence.as_mut().unwrap().reason = "x".repeat(20_000)),
            ("evidence.percentile", |r| {
                r.decision.as_mut().unwrap().evidence.as_mut().unwrap().percentile = f64::INFINITY
            }),
            ("untied_share", |r| {
                r.decision.as_mut().unwrap().evidence.as_mut().unwrap().local_wait_estimate =
                    Some(proto::LocalWaitEstimate { untied_calls: 3, untied_us: 9, untied_share: f64::NAN })
            }),
            ("untied_calls", |r| {
                r.decision.as_mut().unwrap().evidence.as_mut().unwrap().local_wait_estimate =
                    Some(proto::LocalWaitEstimate { untied_calls: u64::MAX, untied_us: 9, untied_share: 0.5 })
            }),
        ];
        for (expected, break_it) in cases {
            let mut report = good();
            break_it(&mut report);
            let error = validate(&report, 5000).unwrap_err();
            assert!(error.0.contains(expected), "{expected:?} not in {error}");
        }
    }
}
