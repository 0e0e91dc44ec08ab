//! Running the operator: the controller over annotated Deployments (all namespaces or a list), leader election
//! on a `Lease` so two replicas never both scale, `/healthz`, `/readyz` and `/metrics` over HTTP, the read-only
//! dashboard (loopback by default), and a graceful shutdown on SIGTERM or Ctrl-C.
//!
//! Untested against a real cluster.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, http::StatusCode, routing::get};
use futures_util::StreamExt;
use k8s_openapi::api::{apps::v1::Deployment, autoscaling::v2::HorizontalPodAutoscaler, core::v1::Pod};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        controller::Config as ControllerConfig,
        events::{Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use kube_lease_manager::LeaseManagerBuilder;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::{
    Error,
    controller::{
        cache::Cache,
        reconcile::{Context, OperatorConfig, error_policy, reconcile},
    },
    crd::ScalingDecision,
    dashboard::Board,
    leadership::{LEASE_NAME, Leadership},
    metrics::Metrics,
};

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    pub http_addr: SocketAddr,
    pub operator: OperatorConfig,
    /// Leader election: the Lease's namespace and this instance's identity; `None`: act without a lease.
    pub leader_election: Option<(String, String)>,
    /// How long the Lease lasts without renewal (whole seconds, at least 2).
    pub lease_duration: Duration,
    /// Where the read-only dashboard listens; `None`: no dashboard.
    pub dashboard_addr: Option<SocketAddr>,
}

/// The HTTP endpoints: liveness, readiness (ready once the controller runs) and metrics.
pub fn http_router(metrics: Arc<Metrics>, ready: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = *ready.borrow();
                async move { if ready { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "starting") } }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    match metrics.encode() {
                        Ok(text) => (StatusCode::OK, text),
                        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, String::new()),
                    }
                }
            }),
        )
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// The APIs of `K` the operator watches: one per namespace, or one for all.
fn apis<K>(client: &Client, namespaces: &[String]) -> Vec<Api<K>>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces.iter().map(|namespace| Api::namespaced(client.clone(), namespace)).collect()
    }
}

/// A store of `K` kept by a watch until `stop`, with `trim` applied to each object before it is kept (to keep
/// only what a reconcile reads).
fn watched<K>(api: Api<K>, trim: fn(&mut K), stop: watch::Receiver<bool>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default()).default_backoff().modify(trim).reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut stop = stop;
        loop {
            tokio::select! {
                next = stream.next() => match next {
                    Some(Err(error)) => tracing::warn!(%error, kind = K::kind(&()).as_ref(), "watch failed; retrying"),
                    Some(Ok(_)) => {}
                    None => return,
                },
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    });
    store
}

/// What a reconcile reads of a pod: its name, namespace and labels, its phase, IP, start and conditions.
fn trim_pod(pod: &mut Pod) {
    pod.spec = None;
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    if let Some(status) = pod.status.as_mut() {
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
    }
}

fn trim_metadata<K: ResourceExt>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(client: Client, config: RunConfig) -> Result<(), Error> {
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    run_until(client, config, stopped).await
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Runs until `stop` turns true.
pub async fn run_until(client: Client, config: RunConfig, stop: watch::Receiver<bool>) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::default());
    let (ready_sender, ready) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|error| Error::InvalidConfig(format!("cannot bind {}: {error}", config.http_addr)))?;
    let router = http_router(metrics.clone(), ready);
    let http_stop = stop.clone();
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).with_graceful_shutdown(stopped(http_stop)).await {
            tracing::error!(%error, "the HTTP server stopped");
        }
    });
    let leader = match &config.leader_election {
        None => Leadership::Always,
        Some((namespace, identity)) => {
            let seconds = config.lease_duration.as_secs().max(2);
            let manager = LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
                .with_namespace(namespace.clone())
                .with_identity(identity.clone())
                .with_duration(seconds)
                // The holder renews a third of the duration before it ends.
                .with_grace((seconds / 3).max(1))
                .build()
                .await
                .map_err(|error| Error::InvalidConfig(format!("leader election: {error}")))?;
            let (holder, _task) = manager.watch().await;
            let leases = Api::namespaced(client.clone(), namespace);
            Leadership::elected(holder, leases, identity.clone(), Duration::from_secs(seconds), stop.clone())
        }
    };
    let reporter = Reporter {
        controller: "rootscale-operator".into(),
        instance: config.leader_election.as_ref().map(|(_, identity)| identity.clone()),
    };
    let board = Arc::new(Board::default());
    if let Some(addr) = config.dashboard_addr {
        let bound = rootscale_dashboard::server::serve(board.dashboard.clone(), addr, stopped(stop.clone()))
            .await
            .map_err(|error| Error::InvalidConfig(format!("cannot bind the dashboard to {addr}: {error}")))?;
        tracing::info!(%bound, "dashboard listening");
    }
    let publisher = board.clone();
    let mut publisher_stop = stop.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = ticks.tick() => publisher.publish_if_changed(),
                _ = publisher_stop.wait_for(|stop| *stop) => return,
            }
        }
    });
    let namespaces = &config.namespaces;
    let cache = Cache {
        pods: apis(&client, namespaces).into_iter().map(|api| watched(api, trim_pod, stop.clone())).collect(),
        decisions: apis::<ScalingDecision>(&client, namespaces)
            .into_iter()
            .map(|api| watched(api, trim_metadata, stop.clone()))
            .collect(),
        autoscalers: apis::<HorizontalPodAutoscaler>(&client, namespaces)
            .into_iter()
            .map(|api| watched(api, trim_metadata, stop.clone()))
            .collect(),
    };
    let context = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        config: config.operator.clone(),
        engines: Mutex::new(HashMap::new()),
        leader,
        metrics,
        failures: Mutex::new(HashMap::new()),
        board,
        cache,
    });
    // One trigger per controller, by namespace (`""` for one over all): the agents' pushes reconcile at once.
    let mut triggers = crate::controller::pushes::Triggers::new();
    let scopes: Vec<String> = if namespaces.is_empty() { vec![String::new()] } else { namespaces.clone() };
    let controllers: Vec<_> = apis::<Deployment>(&client, namespaces)
        .into_iter()
        .zip(scopes)
        .map(|(api, scope)| {
            let (trigger, pushed) = crate::controller::pushes::trigger();
            triggers.insert(scope, trigger);
            Controller::new(api, watcher::Config::default())
                .with_config(ControllerConfig::default().concurrency(config.operator.concurrency))
                .reconcile_on(pushed)
        })
        .collect();
    // What is kept per Deployment goes when the Deployment goes (or stops being managed): checked each resync
    // against the controllers' own caches.
    let deployments: Vec<Store<Deployment>> = controllers.iter().map(Controller::store).collect();
    tokio::spawn(crate::controller::pushes::follow(
        deployments.clone(),
        context.cache.clone(),
        context.config.agents.clone(),
        context.leader.clone(),
        triggers,
        stop.clone(),
    ));
    let pruned = context.clone();
    let mut prune_stop = stop.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(pruned.config.resync);
        loop {
            tokio::select! {
                _ = ticks.tick() => pruned.prune(|key| {
                    let (namespace, name) = key.split_once('/').unwrap_or_default();
                    let reference = reflector::ObjectRef::new(name).within(namespace);
                    deployments.iter().filter_map(|store| store.get(&reference)).any(|deployment| {
                        crate::annotations::parse(deployment.annotations()).is_ok_and(|managed| managed.is_some())
                    })
                }),
                _ = prune_stop.wait_for(|stop| *stop) => return,
            }
        }
    });
    let controllers = controllers.into_iter().map(|controller| {
        let context = context.clone();
        controller.graceful_shutdown_on(stopped(stop.clone())).run(reconcile, error_policy, context).for_each(
            |result| async move {
                if let Err(error) = result {
                    tracing::debug!(%error, "controller event");
                }
            },
        )
    });
    let _ = ready_sender.send(true);
    tracing::info!(namespaces = ?config.namespaces, "rootscale operator running");
    futures_util::future::join_all(controllers).await;
    tracing::info!("rootscale operator stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let (ready_sender, ready) = watch::channel(false);
        let router = http_router(Arc::default(), ready);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        ready_sender.send(true).unwrap();
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let metrics = get("/metrics").await;
        assert!(
            metrics.starts_with("HTTP/1.1 200") && metrics.contains("rootscale_operator_agent_call_seconds_count 0"),
            "{metrics}"
        );
    }
}
