//! The operator's metrics (prometheus-client), served on `/metrics`: reconciles and their errors, decisions by
//! verdict, scale actions, and how long agents take to answer.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// "ok" or the error's metric label.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// "up" or "down".
    pub direction: String,
}

/// Every metric, registered once.
#[derive(Debug)]
pub struct Metrics {
    pub reconciles: Family<ResultLabels, Counter>,
    pub decisions: Family<VerdictLabels, Counter>,
    pub scale_actions: Family<DirectionLabels, Counter>,
    pub agent_call_seconds: Histogram,
    pub registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Family::<ResultLabels, Counter>::default();
        let decisions = Family::<VerdictLabels, Counter>::default();
        let scale_actions = Family::<DirectionLabels, Counter>::default();
        let agent_call_seconds = Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        let mut registry = Registry::with_prefix("rootscale_operator");
        registry.register("reconciles", "Reconciles of managed Deployments, by result", reconciles.clone());
        registry.register("decisions", "Decisions recorded, by the Deployment's verdict", decisions.clone());
        registry.register("scale_actions", "Replica changes applied, by direction", scale_actions.clone());
        registry.register("agent_call_seconds", "Time to ask all of a Deployment's agents", agent_call_seconds.clone());
        Self { reconciles, decisions, scale_actions, agent_call_seconds, registry }
    }
}

impl Metrics {
    /// Prometheus text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_with_the_prefix() {
        let metrics = Metrics::default();
        metrics.reconciles.get_or_create(&ResultLabels { result: "ok".into() }).inc();
        metrics.scale_actions.get_or_create(&DirectionLabels { direction: "up".into() }).inc();
        metrics.agent_call_seconds.observe(0.02);
        let text = metrics.encode().unwrap();
        for expected in [
            "rootscale_operator_reconciles_total{result=\"ok\"} 1",
            "rootscale_operator_scale_actions_total{direction=\"up\"} 1",
            "rootscale_operator_agent_call_seconds_count 1",
        ] {
            assert!(text.contains(expected), "missing {expected} in\n{text}");
        }
    }
}
