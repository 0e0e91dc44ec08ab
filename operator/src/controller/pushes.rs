//! Decisions the agents push: the leader holds an `Advisor.Watch` stream on the agent of every ready pod of every
//! managed Deployment, and when one says its service needs more replicas, that Deployment is reconciled at once
//! instead of at its next resync (docs/DESIGN.md §1.5). Everything else — stabilisation, rate limits, the fence —
//! is the reconcile's, unchanged.
//!
//! Bounded: one stream per ready pod's agent (only while leading), a bounded queue, and at most one pushed
//! reconcile per Deployment every [`PUSH_EVERY_WINDOWS`] of its agents' windows however many pods push. The
//! streams are opened with the same credentials as `Recommend` (token, TLS, the operator's proof), so an agent
//! answers only the operator; what an agent says only schedules a reconcile, which asks all pods as always.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    ResourceExt,
    runtime::reflector::{ObjectRef, Store},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    agents::AgentClient,
    annotations,
    controller::{cache::Cache, pods},
    leadership::Leadership,
};

/// Windows between two pushed reconciles of one Deployment: new pods need a whole window of traffic before their
/// answers count.
pub const PUSH_EVERY_WINDOWS: u64 = 3;
/// How often the set of watched agents follows the pods.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// How long a stream that ended waits before it is opened again.
const REOPEN_AFTER: Duration = Duration::from_secs(1);
/// Pushes queued at most; more are dropped (the resync decides anyway).
const MAX_QUEUED: usize = 1024;

/// A pod's agent said its Deployment needs replicas, for `window_id`.
struct Pushed {
    deployment: ObjectRef<Deployment>,
    window_id: u64,
}

/// Where the pushed reconciles go: one trigger per controller, by namespace (`""` for one watching all).
pub type Triggers = BTreeMap<String, mpsc::Sender<ObjectRef<Deployment>>>;

/// A controller's trigger stream, for `Controller::reconcile_on`.
pub fn trigger() -> (mpsc::Sender<ObjectRef<Deployment>>, impl futures_util::Stream<Item = ObjectRef<Deployment>>) {
    let (sender, mut receiver) = mpsc::channel(MAX_QUEUED);
    (sender, futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx)))
}

/// Follows the managed Deployments' ready pods until `stop` turns true, holding a watch on each one's agent while
/// this instance leads, and sends each pushed Deployment to its controller's trigger.
pub async fn follow(
    deployments: Vec<Store<Deployment>>,
    cache: Cache,
    agents: AgentClient,
    leader: Leadership,
    triggers: Triggers,
    mut stop: watch::Receiver<bool>,
) {
    let (sender, mut pushed) = mpsc::channel::<Pushed>(MAX_QUEUED);
    let mut watching: HashMap<(ObjectRef<Deployment>, SocketAddr), JoinHandle<()>> = HashMap::new();
    let mut last_pushed: HashMap<ObjectRef<Deployment>, u64> = HashMap::new();
    let mut ticks = tokio::time::interval(FOLLOW_EVERY);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let wanted = if leader.leading() && cache.ready() { agents_to_watch(&deployments, &cache) } else { Vec::new() };
                watching.retain(|key, task| {
                    let keep = wanted.contains(key);
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for key in wanted {
                    let (deployment, agent) = (key.0.clone(), key.1);
                    watching
                        .entry(key)
                        .or_insert_with(|| tokio::spawn(watch_agent(agents.clone(), deployment, agent, sender.clone())));
                }
                last_pushed.retain(|deployment, _| watching.keys().any(|(watched, _)| watched == deployment));
            }
            Some(push) = pushed.recv() => {
                let due = last_pushed.get(&push.deployment).is_none_or(|last| push.window_id >= last + PUSH_EVERY_WINDOWS);
                if !due || !leader.leading() {
                    continue;
                }
                last_pushed.insert(push.deployment.clone(), push.window_id);
                let namespace = push.deployment.namespace.clone().unwrap_or_default();
                let trigger = triggers.get(&namespace).or_else(|| triggers.get(""));
                if let Some(trigger) = trigger {
                    tracing::debug!(deployment = %push.deployment, window = push.window_id, "pushed: reconciling now");
                    let _ = trigger.try_send(push.deployment);
                }
            }
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    for task in watching.values() {
        task.abort();
    }
}

/// Every (Deployment, agent) pair to watch: the ready pods of the Deployments rootscale manages.
fn agents_to_watch(deployments: &[Store<Deployment>], cache: &Cache) -> Vec<(ObjectRef<Deployment>, SocketAddr)> {
    let mut wanted = Vec::new();
    let now = k8s_openapi::jiff::Timestamp::now();
    for deployment in deployments.iter().flat_map(Store::state) {
        let Ok(Some(settings)) = annotations::parse(deployment.annotations()) else { continue };
        let Some(selector) = pods::selector(&deployment) else { continue };
        let namespace = deployment.namespace().unwrap_or_default();
        let found = cache.pods_of(&namespace, &selector);
        let found: Vec<&k8s_openapi::api::core::v1::Pod> = found.iter().map(Arc::as_ref).collect();
        let reference = ObjectRef::from_obj(deployment.as_ref());
        for (_, agent) in pods::group(&found, settings.agent_port, now).ready {
            wanted.push((reference.clone(), agent));
        }
    }
    wanted
}

/// Holds a watch on one agent for one Deployment, opening it again whenever it ends, until aborted.
async fn watch_agent(
    agents: AgentClient,
    deployment: ObjectRef<Deployment>,
    agent: SocketAddr,
    pushes: mpsc::Sender<Pushed>,
) {
    let namespace = deployment.namespace.clone().unwrap_or_default();
    loop {
        match agents.watch(agent, &namespace, &deployment.name).await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                while let Some(news) = stream.next().await {
                    let push = Pushed { deployment: deployment.clone(), window_id: news.window_id };
                    if pushes.try_send(push).is_err() {
                        tracing::debug!(%deployment, "a push was dropped: too many queued");
                    }
                }
            }
            Err(error) => tracing::debug!(%agent, %deployment, %error, "could not watch an agent"),
        }
        tokio::time::sleep(REOPEN_AFTER).await;
    }
}
