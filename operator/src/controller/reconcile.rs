//! One reconcile of one Deployment: read its annotations, ask its ready pods' agents, run the engine, patch
//! `/scale` (in `enforce` mode, unless paused), and record the decision (the `ScalingDecision`, Events).
//!
//! Untested against a real cluster: exercised against request-level mocks of the Kubernetes API only.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
    },
};
use serde_json::json;

use crate::{
    Error,
    agents::{AgentClient, Query, ask_all},
    annotations::{self, Mode},
    controller::{pods, status},
    crd::{ScalingDecision, ScalingDecisionSpec, ScalingDecisionStatus, TargetRef},
    dashboard::{Board, Observed},
    engine::Engine,
    metrics::{DirectionLabels, Metrics, ResultLabels, VerdictLabels},
};

/// The field manager of the operator's writes.
pub const MANAGER: &str = "rootscale-operator";

/// Settings that apply to every Deployment.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// How often each managed Deployment is reconciled (HPA's sync period).
    pub resync: Duration,
    /// How the agents are called (timeout, token, TLS), with the channels it keeps open to them.
    pub agents: AgentClient,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self { resync: Duration::from_secs(15), agents: AgentClient::new(Duration::from_secs(2)) }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub config: OperatorConfig,
    /// Per Deployment (namespace/name): HPA's memory of recent recommendations and scale events.
    pub engines: Mutex<HashMap<String, Engine>>,
    /// Whether this instance holds the leader lease; only the leader acts.
    pub leader: tokio::sync::watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    /// Consecutive failed reconciles per Deployment, for the backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// What the dashboard shows.
    pub board: Arc<Board>,
}

/// Writes of `/scale` tried before giving up on conflicts.
const MAX_SCALE_ATTEMPTS: u32 = 3;

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

async fn publish(ctx: &Context, deployment: &Deployment, kind: EventType, reason: &str, note: String) {
    let event =
        Event { type_: kind, reason: reason.to_string(), note: Some(note), action: "Scaling".into(), secondary: None };
    if let Err(error) = ctx.recorder.publish(&event, &deployment.object_ref(&())).await {
        tracing::warn!(%error, reason, "could not publish an Event");
    }
}

/// Creates or updates the Deployment's `ScalingDecision` (owned by it, so it goes when the Deployment goes).
async fn record(ctx: &Context, deployment: &Deployment, status: ScalingDecisionStatus) -> Result<(), Error> {
    let namespace = deployment.namespace().unwrap_or_default();
    let name = deployment.name_any();
    let api: Api<ScalingDecision> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut decision = ScalingDecision::new(
        &name,
        ScalingDecisionSpec {
            target_ref: TargetRef { api_version: "apps/v1".into(), kind: "Deployment".into(), name: name.clone() },
        },
    );
    decision.metadata.owner_references = deployment.controller_owner_ref(&()).map(|owner| vec![owner]);
    let params = PatchParams::apply(MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(&decision)).await?;
    let body = json!({
        "apiVersion": "rootscale.dev/v1alpha1",
        "kind": "ScalingDecision",
        "status": status,
    });
    api.patch_status(&name, &params, &Patch::Apply(&body)).await?;
    Ok(())
}

async fn previous_status(ctx: &Context, namespace: &str, name: &str) -> Option<ScalingDecisionStatus> {
    let api: Api<ScalingDecision> = Api::namespaced(ctx.client.clone(), namespace);
    api.get_opt(name).await.ok().flatten().and_then(|decision| decision.status)
}

/// Reconciles one Deployment.
pub async fn reconcile(deployment: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let settings = match annotations::parse(deployment.annotations()) {
        Ok(None) => return Ok(Action::await_change()),
        Ok(Some(settings)) => Ok(settings),
        Err(error) => Err(error),
    };
    if !*ctx.leader.borrow() {
        // Another instance leads; look again later in case leadership moves here.
        return Ok(Action::requeue(ctx.config.resync));
    }
    let namespace = deployment.namespace().unwrap_or_default();
    let name = deployment.name_any();
    let key = format!("{namespace}/{name}");
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let scale = match deployments.get_scale(&name).await {
        Ok(scale) => scale,
        // Deleted while we were looking: nothing to do; its ScalingDecision goes with it.
        Err(kube::Error::Api(status)) if status.code == 404 => {
            ctx.board.forget(&namespace, &name);
            return Ok(Action::await_change());
        }
        Err(error) => return Err(error.into()),
    };
    let replicas_of = |scale: &k8s_openapi::api::autoscaling::v1::Scale| {
        scale.spec.as_ref().and_then(|spec| spec.replicas).and_then(|r| u32::try_from(r).ok()).unwrap_or(0)
    };
    let mut current = replicas_of(&scale);
    let mut scale_version = scale.metadata.resource_version.clone();
    let previous = previous_status(&ctx, &namespace, &name).await;
    let settings = match settings {
        Ok(settings) => settings,
        Err(error) => {
            tracing::warn!(deployment = %key, %error, "invalid annotation");
            publish(&ctx, &deployment, EventType::Warning, "InvalidAnnotation", error.to_string()).await;
            record(&ctx, &deployment, status::invalid(previous.as_ref(), &name, current, &error, &now_rfc3339()))
                .await?;
            return Ok(Action::requeue(ctx.config.resync));
        }
    };
    let pods = match pods::selector(&deployment) {
        Some(selector) => {
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
            api.list(&ListParams::default().labels(&selector)).await?.items
        }
        None => Vec::new(),
    };
    let agents = pods::ready_agents(&pods, settings.agent_port);
    let query = Query {
        namespace: namespace.clone(),
        deployment: name.clone(),
        slo: settings.slo,
        target_utilization: settings.target_utilization,
        current_replicas: current,
        scale_down_stabilization: settings.scale_down_stabilization,
    };
    let asked = Instant::now();
    let answers = ask_all(&agents, &query, &ctx.config.agents).await;
    ctx.metrics.agent_call_seconds.observe(asked.elapsed().as_secs_f64());
    if !answers.is_empty() && answers.iter().all(|answer| answer.advice().is_none()) {
        let why = answers.iter().filter_map(|a| a.advice.as_ref().err()).next().cloned().unwrap_or_default();
        publish(&ctx, &deployment, EventType::Warning, "AgentUnreachable", why).await;
    }
    let advices: Vec<_> = answers.iter().map(|answer| answer.advice()).collect();
    let config = settings.target_config();
    let decide = |current: u32| {
        let mut engines = ctx.engines.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        engines.entry(key.clone()).or_default().decide(Instant::now(), &config, current, &advices)
    };
    let mut outcome = decide(current);
    let mut applied = false;
    let mut failed_update = None;
    let acts = !settings.paused && settings.mode == Mode::Enforce;
    for attempt in 1..=MAX_SCALE_ATTEMPTS {
        if !acts || outcome.desired == current {
            break;
        }
        // The resourceVersion read makes the write conditional: a change by someone else in between is a 409.
        let patch =
            json!({ "metadata": { "resourceVersion": scale_version }, "spec": { "replicas": outcome.desired } });
        match deployments.patch_scale(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Err(kube::Error::Api(status)) if status.code == 409 && attempt < MAX_SCALE_ATTEMPTS => {
                // Replicas changed since they were read: decide again on fresh state.
                let fresh = deployments.get_scale(&name).await?;
                current = replicas_of(&fresh);
                scale_version = fresh.metadata.resource_version.clone();
                outcome = decide(current);
            }
            Ok(_) => {
                applied = true;
                let direction = if outcome.desired > current { "up" } else { "down" };
                ctx.metrics.scale_actions.get_or_create(&DirectionLabels { direction: direction.into() }).inc();
                {
                    let mut engines = ctx.engines.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    engines.entry(key.clone()).or_default().record_scale(Instant::now(), current, outcome.desired);
                }
                let note = format!("New size: {}; reason: {}", outcome.desired, outcome.reason);
                publish(&ctx, &deployment, EventType::Normal, "SuccessfulRescale", note).await;
                break;
            }
            Err(error) => {
                let message = format!("failed to set replicas to {}: {error}", outcome.desired);
                publish(&ctx, &deployment, EventType::Warning, "FailedRescale", message.clone()).await;
                failed_update = Some(message);
                break;
            }
        }
    }
    let seen = status::Observation {
        deployment: &name,
        settings: &settings,
        answers: &answers,
        outcome: &outcome,
        applied,
        failed_update,
    };
    let decided = status::decided(previous.as_ref(), &seen, &now_rfc3339());
    ctx.board.observe(Observed {
        namespace: &namespace,
        deployment: &name,
        current,
        desired: outcome.desired,
        applied,
        mode: &decided.mode,
        verdict: &decided.verdict,
        suspect: decided.suspect.as_deref(),
        reason: &outcome.reason,
        slo: settings.slo.map(|(latency, _)| latency),
        answers: &answers,
    });
    ctx.metrics.decisions.get_or_create(&VerdictLabels { verdict: decided.verdict.clone() }).inc();
    record(&ctx, &deployment, decided).await?;
    ctx.metrics.reconciles.get_or_create(&ResultLabels { result: "ok".into() }).inc();
    ctx.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&key);
    tracing::info!(deployment = %key, current, desired = outcome.desired, applied, reason = %outcome.reason, "reconciled");
    Ok(Action::requeue(ctx.config.resync))
}

/// On an error (an API call failed): try again soon; the next resync would anyway.
/// On an error (an API call failed, a 5xx): try again with exponential backoff, 1 s doubling up to 1 min, reset
/// by the next success.
pub fn error_policy(deployment: Arc<Deployment>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconciles.get_or_create(&ResultLabels { result: error.metric_label().into() }).inc();
    let key = format!("{}/{}", deployment.namespace().unwrap_or_default(), deployment.name_any());
    let failures = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = failures.entry(key).or_default();
        *count = count.saturating_add(1);
        *count
    };
    let backoff = Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60));
    tracing::warn!(deployment = %deployment.name_any(), %error, failures, ?backoff, "reconcile failed");
    Action::requeue(backoff)
}
