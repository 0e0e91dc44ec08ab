//! The agent's own metrics (prometheus-client), exposed with the tracer's on `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::decide::Verdict;

const VERDICTS: [Verdict; 7] = [
    Verdict::Healthy,
    Verdict::RootCause,
    Verdict::Delegated,
    Verdict::Network,
    Verdict::Saturated,
    Verdict::Idle,
    Verdict::InsufficientData,
];

/// Counters the agent keeps; all atomics, read on scrape.
#[derive(Debug, Default)]
pub(crate) struct AgentMetrics {
    decisions: [AtomicU64; 7],
    current: AtomicU64,
    sent_ok: AtomicU64,
    sent_failed: AtomicU64,
    received: [AtomicU64; RECEIVED.len()],
    refused_messages: [AtomicU64; REFUSED_MESSAGES.len()],
    refused_calls: [AtomicU64; REFUSED_CALLS.len()],
    closed_connections: [AtomicU64; CLOSED_CONNECTIONS.len()],
    report_bytes: AtomicU64,
}

/// What became of a received report (the inbox's outcomes, and the port's checks before it).
pub(crate) const RECEIVED: [&str; 9] = [
    "accepted",
    "held",
    "stale_window",
    "not_a_neighbor",
    "unverified_agent",
    "too_late",
    "full",
    "invalid",
    "unauthenticated",
];
/// gRPC messages refused before any handler saw them.
pub(crate) const REFUSED_MESSAGES: [&str; 2] = ["undecodable", "oversize"];
/// `Advisor` calls refused, by reason.
pub(crate) const REFUSED_CALLS: [&str; 2] = ["unauthenticated", "invalid"];
/// Connections the port closed, by reason.
pub(crate) const CLOSED_CONNECTIONS: [&str; 3] = ["idle", "no_request", "too_many"];

fn bump(counters: &[AtomicU64], labels: &[&str], label: &str) {
    let index = labels.iter().position(|known| *known == label).unwrap_or(labels.len() - 1);
    counters[index].fetch_add(1, Relaxed);
}

fn encode_counters(
    encoder: &mut DescriptorEncoder,
    service: &str,
    (name, help, label): (&str, &str, &str),
    labels: &[&str],
    counters: &[AtomicU64],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, count) in labels.iter().zip(counters) {
        let labels = [("service", service.to_string()), (label, value.to_string())];
        ConstCounter::new(count.load(Relaxed)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn index(verdict: Verdict) -> usize {
    VERDICTS.iter().position(|v| *v == verdict).unwrap_or(0)
}

impl AgentMetrics {
    pub fn decided(&self, verdict: Verdict) {
        self.decisions[index(verdict)].fetch_add(1, Relaxed);
        self.current.store(index(verdict) as u64, Relaxed);
    }

    pub fn sent(&self, ok: bool) {
        if ok { &self.sent_ok } else { &self.sent_failed }.fetch_add(1, Relaxed);
    }

    /// A report's outcome, one of [`RECEIVED`].
    pub fn received(&self, outcome: &str) {
        bump(&self.received, &RECEIVED, outcome);
    }

    /// A message refused undecoded, one of [`REFUSED_MESSAGES`].
    pub fn refused_message(&self, reason: &str) {
        bump(&self.refused_messages, &REFUSED_MESSAGES, reason);
    }

    /// An `Advisor` call refused, one of [`REFUSED_CALLS`].
    pub fn refused_call(&self, reason: &str) {
        bump(&self.refused_calls, &REFUSED_CALLS, reason);
    }

    /// A connection closed by the port, one of [`CLOSED_CONNECTIONS`].
    pub fn closed_connection(&self, reason: &str) {
        bump(&self.closed_connections, &CLOSED_CONNECTIONS, reason);
    }

    /// Reports sent (delivered or not) and their encoded bytes.
    pub fn reports_sent(&self) -> (u64, u64) {
        (self.sent_ok.load(Relaxed) + self.sent_failed.load(Relaxed), self.report_bytes.load(Relaxed))
    }

    pub fn report_bytes(&self, bytes: u64) {
        self.report_bytes.fetch_add(bytes, Relaxed);
    }

    pub fn encode(
        &self,
        encoder: &mut DescriptorEncoder,
        service: &str,
        neighbors: (usize, usize, u64),
    ) -> Result<(), std::fmt::Error> {
        let service = service.to_string();
        let mut family = encoder.encode_descriptor(
            "rootscale_agent_decisions",
            "Window decisions by verdict.",
            None,
            MetricType::Counter,
        )?;
        for verdict in VERDICTS {
            let labels = [("service", service.clone()), ("verdict", verdict.as_str().to_string())];
            ConstCounter::new(self.decisions[index(verdict)].load(Relaxed)).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "rootscale_agent_verdict",
            "1 for the verdict of the latest window.",
            None,
            MetricType::Gauge,
        )?;
        let current = self.current.load(Relaxed) as usize;
        for (i, verdict) in VERDICTS.iter().enumerate() {
            let labels = [("service", service.clone()), ("verdict", verdict.as_str().to_string())];
            ConstGauge::new(u64::from(i == current)).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "rootscale_agent_reports_sent",
            "Reports sent to neighbours.",
            None,
            MetricType::Counter,
        )?;
        for (result, count) in [("ok", &self.sent_ok), ("failed", &self.sent_failed)] {
            let labels = [("service", service.clone()), ("result", result.to_string())];
            ConstCounter::new(count.load(Relaxed)).encode(family.encode_family(&labels)?)?;
        }
        encode_counters(
            encoder,
            &service,
            ("rootscale_agent_reports_received", "Reports received from neighbours, by outcome.", "result"),
            &RECEIVED,
            &self.received,
        )?;
        encode_counters(
            encoder,
            &service,
            (
                "rootscale_agent_refused_messages",
                "gRPC messages refused with INVALID_ARGUMENT before a handler saw them, by reason.",
                "reason",
            ),
            &REFUSED_MESSAGES,
            &self.refused_messages,
        )?;
        encode_counters(
            encoder,
            &service,
            ("rootscale_agent_advisor_refused", "Advisor calls refused, by reason.", "reason"),
            &REFUSED_CALLS,
            &self.refused_calls,
        )?;
        encode_counters(
            encoder,
            &service,
            ("rootscale_agent_connections_closed", "Connections the agent's port closed, by reason.", "reason"),
            &CLOSED_CONNECTIONS,
            &self.closed_connections,
        )?;
        let mut family = encoder.encode_descriptor(
            "rootscale_agent_report_bytes",
            "Encoded bytes of the reports sent.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.report_bytes.load(Relaxed))
            .encode(family.encode_family(&[("service", service.clone())])?)?;
        let (known, stale, refused) = neighbors;
        let mut family = encoder.encode_descriptor(
            "rootscale_agent_neighbors",
            "Neighbours known and stale.",
            None,
            MetricType::Gauge,
        )?;
        for (state, count) in [("known", known as u64), ("stale", stale as u64), ("refused", refused)] {
            let labels = [("service", service.clone()), ("state", state.to_string())];
            ConstGauge::new(count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
