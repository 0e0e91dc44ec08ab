//! The `ScalingDecision` custom resource (`rootscale.dev/v1alpha1`): one per managed Deployment, owned by it, with
//! the latest decision in its status. `kubectl get scalingdecisions -w` (short name `sd`) reads like
//! `kubectl get hpa -w`: reference, latency against the SLO, verdict, bounds, replicas.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Decisions kept in the status history.
pub const HISTORY: usize = 10;

/// Which Deployment the decision is about.
// kube's `printcolumn(...)` is repeated once per column by design; clippy reads that as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "rootscale.dev",
    version = "v1alpha1",
    kind = "ScalingDecision",
    plural = "scalingdecisions",
    shortname = "sd",
    namespaced,
    status = "ScalingDecisionStatus",
    printcolumn(name = "Reference", type_ = "string", json_path = ".status.reference"),
    printcolumn(name = "Targets", type_ = "string", json_path = ".status.targets"),
    printcolumn(name = "Verdict", type_ = "string", json_path = ".status.verdict"),
    printcolumn(name = "MinPods", type_ = "integer", json_path = ".status.minReplicas"),
    printcolumn(name = "MaxPods", type_ = "integer", json_path = ".status.maxReplicas"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.currentReplicas"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredReplicas"),
    printcolumn(name = "Suspect", type_ = "string", json_path = ".status.suspect", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ScalingDecisionSpec {
    /// The managed Deployment.
    pub target_ref: TargetRef,
}

/// A reference to the scaled object.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

/// The latest decision.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingDecisionStatus {
    /// `Deployment/<name>`, for the printer column.
    pub reference: String,
    /// Observed latency against the SLO, such as `182ms/200ms` (HPA's `TARGETS`), or `<unknown>`.
    pub targets: String,
    /// The combined verdict: healthy, root-cause, delegated, network, saturated, idle, insufficient-data; or why
    /// nothing was decided: invalid (bad annotations), disabled (zero replicas), conflict (another autoscaler).
    pub verdict: String,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub current_replicas: u32,
    pub desired_replicas: u32,
    /// The SLO latency in milliseconds, if the Deployment has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_ms: Option<f64>,
    /// The observed latency at the SLO percentile, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_ms: Option<f64>,
    /// Where the agents say the bottleneck is (the service a delegation points at).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspect: Option<String>,
    pub reason: String,
    /// `enforce` or `recommend` (dry run).
    pub mode: String,
    /// HPA-style: `AbleToScale`, `ScalingActive`, `ScalingLimited`.
    pub conditions: Vec<Condition>,
    /// The last decisions, newest first.
    pub history: Vec<HistoryEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_decision_time: Option<String>,
    /// The engine's memory, for the next leader: recent recommendations and scale events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<EngineMemory>,
}

/// What the engine remembers (`engine::Memory`), oldest first, at most `engine::MAX_REMEMBERED` of each.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EngineMemory {
    pub recommendations: Vec<RememberedCount>,
    /// Replicas added by each recent scale-up.
    pub scale_ups: Vec<RememberedCount>,
    /// Replicas removed by each recent scale-down.
    pub scale_downs: Vec<RememberedCount>,
}

/// A count at a time (Unix seconds).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RememberedCount {
    pub unix_seconds: u64,
    pub replicas: u32,
}

impl From<&crate::engine::Memory> for EngineMemory {
    fn from(memory: &crate::engine::Memory) -> Self {
        let list = |entries: &[crate::engine::Remembered]| {
            entries.iter().map(|e| RememberedCount { unix_seconds: e.unix, replicas: e.value }).collect()
        };
        Self {
            recommendations: list(&memory.recommendations),
            scale_ups: list(&memory.scale_ups),
            scale_downs: list(&memory.scale_downs),
        }
    }
}

impl From<&EngineMemory> for crate::engine::Memory {
    fn from(memory: &EngineMemory) -> Self {
        let list = |entries: &[RememberedCount]| {
            entries.iter().map(|e| crate::engine::Remembered { unix: e.unix_seconds, value: e.replicas }).collect()
        };
        Self {
            recommendations: list(&memory.recommendations),
            scale_ups: list(&memory.scale_ups),
            scale_downs: list(&memory.scale_downs),
        }
    }
}

/// An HPA-style condition.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

/// One past decision.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub time: String,
    pub verdict: String,
    pub from_replicas: u32,
    pub to_replicas: u32,
    /// Whether the change was applied (false in `recommend` mode or when limited to no change).
    pub applied: bool,
    pub reason: String,
}

/// The CRD as YAML, for the Helm chart and `kubectl apply`.
pub fn yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt as _;
    serde_yaml::to_string(&ScalingDecision::crd())
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt as _;

    use super::*;

    #[test]
    fn the_crd_reads_like_kubectl_get_hpa() {
        let crd = ScalingDecision::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("scalingdecisions.rootscale.dev"));
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["sd".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
        let columns: Vec<&str> =
            version.additional_printer_columns.iter().flatten().map(|column| column.name.as_str()).collect();
        assert_eq!(
            columns,
            ["Reference", "Targets", "Verdict", "MinPods", "MaxPods", "Replicas", "Desired", "Suspect", "Age"]
        );
        let text = yaml().unwrap();
        assert!(text.contains("kind: CustomResourceDefinition") && text.contains("openAPIV3Schema"), "{text}");
    }

    #[test]
    fn the_chart_ships_the_crd_the_operator_generates() {
        let shipped = include_str!("../../charts/rootscale/crds/scalingdecisions.rootscale.dev.yaml");
        assert!(
            shipped == yaml().unwrap(),
            "charts/rootscale/crds is stale: run `cargo run -p rootscale-operator -- crd > charts/rootscale/crds/scalingdecisions.rootscale.dev.yaml`"
        );
    }
}
