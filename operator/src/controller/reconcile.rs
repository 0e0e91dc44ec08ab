//! One reconcile of one Deployment — wiring only: read its annotations, check HPA's preconditions (a count above
//! zero, no other autoscaler), group its pods ([`pods`]), ask their agents ([`crate::agents`]), let the engine
//! decide and apply through the Deployment's `/scale` ([`target`]), and record the decision ([`status`], Events).
//!
//! Everything read comes from the watches' caches ([`crate::controller::cache`]): at steady state a reconcile makes no request but
//! the status write, and none at all when the status did not change. Events mark changes, not resyncs.
//!
//! Untested against a real cluster: exercised against request-level mocks and the in-process stand-in only.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
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
    controller::{cache::Cache, pods, status, target::DeploymentScale},
    crd::{ScalingDecision, ScalingDecisionSpec, ScalingDecisionStatus, TargetRef},
    dashboard::{Board, Observed},
    engine::{Engine, Pods},
    leadership::Leadership,
    metrics::{DirectionLabels, Metrics, ResultLabels, VerdictLabels},
};

/// The field manager of the operator's writes.
pub const MANAGER: &str = "rootscale-operator";
/// HPA's sync period.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(15);
/// How long an agent has to answer.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deployments reconciled at once: agent calls are bounded by the timeout, so this bounds the work in flight.
pub const DEFAULT_CONCURRENCY: u16 = 32;
/// How soon to look again while the watches have not listed everything yet.
const CACHE_WAIT: Duration = Duration::from_secs(1);

/// Settings that apply to every Deployment.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// How often each managed Deployment is reconciled (HPA's sync period).
    pub resync: Duration,
    /// How the agents are called (timeout, token, TLS), with the channels it keeps open to them.
    pub agents: AgentClient,
    /// Deployments reconciled at once.
    pub concurrency: u16,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            resync: DEFAULT_RESYNC,
            agents: AgentClient::new(DEFAULT_AGENT_TIMEOUT),
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub config: OperatorConfig,
    /// Per Deployment (namespace/name): HPA's memory of recent recommendations and scale events.
    pub engines: Mutex<HashMap<String, Engine>>,
    /// Whether this instance holds the leader lease (fenced by its deadline); only the leader acts.
    pub leader: Leadership,
    pub metrics: Arc<Metrics>,
    /// Consecutive failed reconciles per Deployment, for the backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// What the dashboard shows.
    pub board: Arc<Board>,
    pub cache: Cache,
}

impl Context {
    fn leading(&self) -> bool {
        self.leader.leading()
    }

    /// Drops what is kept for a Deployment the operator no longer manages (deleted, or its annotation removed).
    pub fn forget(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        self.engines.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&key);
        self.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&key);
        self.board.forget(namespace, name);
    }

    /// Keeps only the Deployments `managed` says are still managed (by `namespace/name`).
    pub fn prune(&self, managed: impl Fn(&str) -> bool) {
        self.engines.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).retain(|key, _| managed(key));
        self.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).retain(|key, _| managed(key));
        self.board.retain(|namespace, name| managed(&format!("{namespace}/{name}")));
    }

    async fn publish(&self, deployment: &Deployment, kind: EventType, reason: &str, note: String) {
        if !self.leading() {
            return;
        }
        let event = Event {
            type_: kind,
            reason: reason.to_string(),
            note: Some(crate::agents::bounded_text(&note)),
            action: "Scaling".into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &deployment.object_ref(&())).await {
            tracing::warn!(%error, reason, "could not publish an Event");
        }
    }

    /// Writes the Deployment's `ScalingDecision` (owned by it, so it goes when the Deployment goes) when it does
    /// not exist yet, and its status when `status` differs from what is stored — apart from the decision's time.
    async fn record(
        &self,
        deployment: &Deployment,
        stored: Option<&ScalingDecision>,
        status: ScalingDecisionStatus,
    ) -> Result<(), Error> {
        let unchanged = |previous: &ScalingDecisionStatus| {
            ScalingDecisionStatus { last_decision_time: None, ..previous.clone() }
                == ScalingDecisionStatus { last_decision_time: None, ..status.clone() }
        };
        if stored.and_then(|decision| decision.status.as_ref()).is_some_and(unchanged) || !self.leading() {
            return Ok(());
        }
        let namespace = deployment.namespace().unwrap_or_default();
        let name = deployment.name_any();
        let api: Api<ScalingDecision> = Api::namespaced(self.client.clone(), &namespace);
        let params = PatchParams::apply(MANAGER).force();
        if stored.is_none() {
            let mut decision = ScalingDecision::new(
                &name,
                ScalingDecisionSpec {
                    target_ref: TargetRef {
                        api_version: "apps/v1".into(),
                        kind: "Deployment".into(),
                        name: name.clone(),
                    },
                },
            );
            decision.metadata.owner_references = deployment.controller_owner_ref(&()).map(|owner| vec![owner]);
            api.patch(&name, &params, &Patch::Apply(&decision)).await?;
        }
        let body = json!({
            "apiVersion": "rootscale.dev/v1alpha1",
            "kind": "ScalingDecision",
            "status": status,
        });
        api.patch_status(&name, &params, &Patch::Apply(&body)).await?;
        Ok(())
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// The reason of `kind`'s condition in a status, if it has one.
fn condition_reason<'s>(status: Option<&'s ScalingDecisionStatus>, kind: &str) -> Option<&'s str> {
    status?.conditions.iter().find(|condition| condition.type_ == kind).map(|condition| condition.reason.as_str())
}

/// Reconciles one Deployment.
pub async fn reconcile(deployment: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = deployment.namespace().unwrap_or_default();
    let name = deployment.name_any();
    let key = format!("{namespace}/{name}");
    let settings = match annotations::parse(deployment.annotations()) {
        Ok(None) => {
            ctx.forget(&namespace, &name);
            return Ok(Action::await_change());
        }
        Ok(Some(settings)) => Ok(settings),
        Err(error) => Err(error),
    };
    if !ctx.leading() {
        // Another instance leads; look again later in case leadership moves here.
        return Ok(Action::requeue(ctx.config.resync));
    }
    if !ctx.cache.ready() {
        return Ok(Action::requeue(CACHE_WAIT));
    }
    let stored = ctx.cache.decision(&namespace, &name);
    let previous = stored.as_ref().and_then(|decision| decision.status.as_ref());
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let target = DeploymentScale::new(deployments, &deployment, ctx.leader.clone());
    let current = target.last_read().unwrap_or(0);
    let now = now_rfc3339();
    let settings = match settings {
        Ok(settings) => settings,
        Err(error) => {
            let status = status::invalid(previous, &name, current, &error, &now);
            if previous.is_none_or(|p| p.verdict != status.verdict || p.reason != status.reason) {
                tracing::warn!(deployment = %key, %error, "invalid annotation");
                ctx.publish(&deployment, EventType::Warning, "InvalidAnnotation", error.to_string()).await;
            }
            ctx.record(&deployment, stored.as_deref(), status).await?;
            return Ok(Action::requeue(ctx.config.resync));
        }
    };
    // HPA's preconditions: a Deployment at zero replicas is not autoscaled, and neither is one another
    // autoscaler already scales (the two would overwrite each other).
    if current == 0 {
        ctx.record(&deployment, stored.as_deref(), status::disabled(previous, &name, &settings, &now)).await?;
        return Ok(Action::requeue(ctx.config.resync));
    }
    if let Some(other) = ctx.cache.other_autoscaler(&namespace, &name) {
        let status = status::conflicting(previous, &name, &settings, current, &other, &now);
        if condition_reason(previous, "AbleToScale") != Some(status::CONFLICTING_AUTOSCALER) {
            let note = format!(
                "HorizontalPodAutoscaler {namespace}/{other} also scales this Deployment: rootscale leaves it alone until one of them is removed"
            );
            ctx.publish(&deployment, EventType::Warning, status::CONFLICTING_AUTOSCALER, note).await;
        }
        ctx.record(&deployment, stored.as_deref(), status).await?;
        return Ok(Action::requeue(ctx.config.resync));
    }
    let pods: Vec<Arc<Pod>> = match pods::selector(&deployment) {
        Some(selector) => ctx.cache.pods_of(&namespace, &selector),
        None => Vec::new(),
    };
    let pods: Vec<&Pod> = pods.iter().map(AsRef::as_ref).collect();
    let groups = pods::group(&pods, settings.agent_port, k8s_openapi::jiff::Timestamp::now());
    let query = Query {
        namespace: namespace.clone(),
        deployment: name.clone(),
        slo: settings.slo,
        target_utilization: settings.target_utilization,
        current_replicas: current,
    };
    let asked = Instant::now();
    let answers = ask_all(&groups.ready, &query, &ctx.config.agents).await;
    ctx.metrics.agent_call_seconds.observe(asked.elapsed().as_secs_f64());
    let advices: Vec<_> = answers.iter().map(|answer| answer.advice()).collect();
    let config = settings.target_config();
    let acts = !settings.paused && settings.mode == Mode::Enforce;
    // A new leader (or a restarted operator) goes on from the memory its predecessor left in the status, so
    // stabilisation and rate limits survive a hand-over.
    let kept = ctx.engines.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&key);
    let mut engine = kept.unwrap_or_else(|| match previous.and_then(|status| status.memory.as_ref()) {
        Some(memory) => Engine::restored(&memory.into(), Instant::now(), unix_now()),
        None => Engine::default(),
    });
    let run =
        engine.run(Instant::now(), &config, &target, Pods { ready: &advices, unready: groups.unready }, acts).await;
    let memory = engine.memory();
    ctx.engines.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(key.clone(), engine);
    let run = run?;
    let outcome = &run.outcome;
    if run.applied {
        let direction = if outcome.desired > outcome.current { "up" } else { "down" };
        ctx.metrics.scale_actions.get_or_create(&DirectionLabels { direction: direction.into() }).inc();
        let note = format!("New size: {}; reason: {}", outcome.desired, outcome.reason);
        ctx.publish(&deployment, EventType::Normal, "SuccessfulRescale", note).await;
    }
    if let Some(failed) = &run.failed {
        ctx.publish(&deployment, EventType::Warning, "FailedRescale", failed.clone()).await;
    }
    let seen = status::Observation {
        deployment: &name,
        settings: &settings,
        answers: &answers,
        outcome,
        applied: run.applied,
        failed_update: run.failed.clone(),
    };
    let mut decided = status::decided(previous, &seen, &now);
    decided.memory = Some((&memory).into());
    let unreachable = !answers.is_empty() && answers.iter().all(|answer| answer.advice().is_none());
    if unreachable && condition_reason(previous, "ScalingActive") != condition_reason(Some(&decided), "ScalingActive") {
        let why = answers.iter().filter_map(|a| a.advice.as_ref().err()).next().cloned().unwrap_or_default();
        ctx.publish(&deployment, EventType::Warning, "AgentUnreachable", why).await;
    }
    ctx.board.observe(Observed {
        namespace: &namespace,
        deployment: &name,
        current: outcome.current,
        desired: outcome.desired,
        applied: run.applied,
        mode: &decided.mode,
        verdict: &decided.verdict,
        suspect: decided.suspect.as_deref(),
        reason: &outcome.reason,
        slo: settings.slo.map(|(latency, _)| latency),
        answers: &answers,
    });
    ctx.metrics.decisions.get_or_create(&VerdictLabels { verdict: decided.verdict.clone() }).inc();
    ctx.record(&deployment, stored.as_deref(), decided).await?;
    ctx.metrics.reconciles.get_or_create(&ResultLabels { result: "ok".into() }).inc();
    ctx.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&key);
    tracing::info!(deployment = %key, current = outcome.current, desired = outcome.desired, applied = run.applied, reason = %outcome.reason, "reconciled");
    Ok(Action::requeue(ctx.config.resync))
}

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
