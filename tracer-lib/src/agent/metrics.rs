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
    received_accepted: AtomicU64,
    received_stale_window: AtomicU64,
    received_not_a_neighbor: AtomicU64,
    received_invalid: AtomicU64,
    received_unauthenticated: AtomicU64,
    report_bytes: AtomicU64,
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

    pub fn received(&self, outcome: &str) {
        match outcome {
            "accepted" => &self.received_accepted,
            "stale_window" => &self.received_stale_window,
            "not_a_neighbor" => &self.received_not_a_neighbor,
            "unauthenticated" => &self.received_unauthenticated,
            _ => &self.received_invalid,
        }
        .fetch_add(1, Relaxed);
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
        let mut family = encoder.encode_descriptor(
            "rootscale_agent_reports_received",
            "Reports received from neighbours, by outcome.",
            None,
            MetricType::Counter,
        )?;
        for (result, count) in [
            ("accepted", &self.received_accepted),
            ("stale_window", &self.received_stale_window),
            ("not_a_neighbor", &self.received_not_a_neighbor),
            ("invalid", &self.received_invalid),
            ("unauthenticated", &self.received_unauthenticated),
        ] {
            let labels = [("service", service.clone()), ("result", result.to_string())];
            ConstCounter::new(count.load(Relaxed)).encode(family.encode_family(&labels)?)?;
        }
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
