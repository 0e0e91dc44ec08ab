//! Running the operator: the controller over annotated Deployments (all namespaces or a list), leader election
//! on a `Lease` so two replicas never both scale, `/healthz`, `/readyz` and `/metrics` over HTTP, the read-only
//! dashboard (loopback by default), and a graceful shutdown on SIGTERM or Ctrl-C.
//!
//! Untested against a real cluster.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, http::StatusCode, routing::get};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api, Client,
    runtime::{
        Controller,
        events::{Recorder, Reporter},
        watcher,
    },
};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

use crate::{
    Error,
    controller::reconcile::{Context, OperatorConfig, error_policy, reconcile},
    dashboard::Board,
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
        None => watch::channel(true).1,
        Some((namespace, identity)) => {
            let manager = LeaseManagerBuilder::new(client.clone(), "rootscale-operator")
                .with_namespace(namespace.clone())
                .with_identity(identity.clone())
                .build()
                .await
                .map_err(|error| Error::InvalidConfig(format!("leader election: {error}")))?;
            let (leader, _task) = manager.watch().await;
            leader
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
    let context = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        config: config.operator.clone(),
        engines: Mutex::new(HashMap::new()),
        leader,
        metrics,
        failures: Mutex::new(HashMap::new()),
        board,
    });
    let apis: Vec<Api<Deployment>> = if config.namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        config.namespaces.iter().map(|namespace| Api::namespaced(client.clone(), namespace)).collect()
    };
    let controllers = apis.into_iter().map(|api| {
        let context = context.clone();
        Controller::new(api, watcher::Config::default())
            .graceful_shutdown_on(stopped(stop.clone()))
            .run(reconcile, error_policy, context)
            .for_each(|result| async move {
                if let Err(error) = result {
                    tracing::debug!(%error, "controller event");
                }
            })
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
