//! The agent's port: `Neighbor` and `Advisor`, gRPC health (an entry for every service) and server reflection (v1
//! and v1alpha), and HTTP `/metrics`, served by one tonic server — over mutual TLS when configured.
//!
//! - [`access`]: who may call, and as whom (token, mesh key, certificates).
//! - [`services`]: the two services' handlers.
//! - [`refused`]: undecodable and oversize messages answered INVALID_ARGUMENT, and counted.
//! - [`connections`]: bounded connections: how many, how long without a first request, how long idle.

mod access;
mod connections;
mod refused;
mod services;

use std::{future::Future, sync::Arc, time::Duration};

use axum::{http::header::CONTENT_TYPE, response::IntoResponse, routing::get};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};
use rootscale_proto::v1::{advisor_server::AdvisorServer, neighbor_server::NeighborServer};
use tokio::sync::watch;
use tonic::{service::Routes, transport::Server};

pub(crate) use access::{Access, Tls};

use crate::{
    Error,
    agent::{
        port::services::{AdvisorService, NeighborService},
        state::AgentState,
    },
};

/// Messages larger than this are refused before they are decoded, so a flood of large messages costs little
/// memory; reports have their own, smaller limit (`MAX_REPORT_BYTES`). Both answer INVALID_ARGUMENT.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Concurrent calls per connection to the agent's port.
const MAX_CONCURRENT_CALLS: usize = 32;

/// The tracer's and the agent's metrics, read on each scrape.
#[derive(Debug)]
struct AgentCollector(Arc<AgentState>);

impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentState").field("service", &self.service).finish()
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.0.metrics.encode(&mut encoder, &self.0.service, self.0.neighbor_counts())
    }
}

/// Metrics of the process hosting the agent, given to [`AgentBuilder::extra_metrics`](crate::AgentBuilder::extra_metrics).
#[derive(Debug)]
struct ExtraCollector(Arc<dyn Collector>);

impl Collector for ExtraCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

/// Service names with a health entry: every service the port serves.
const SERVED: [&str; 5] = [
    "rootscale.v1.Neighbor",
    "rootscale.v1.Advisor",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The server future, ready to spawn; it ends when `stop` turns true.
pub(crate) fn serve(
    state: Arc<AgentState>,
    listener: tokio::net::TcpListener,
    access: Access,
    extra_metrics: Vec<Arc<dyn Collector>>,
    mut stop: watch::Receiver<bool>,
) -> Result<impl Future<Output = ()> + Send + 'static, Error> {
    let tls = access.tls.clone();
    let neighbor = NeighborServer::new(NeighborService { state: state.clone(), access: access.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let advisor = AdvisorServer::new(AdvisorService {
        state: state.clone(),
        access,
        watchers: Default::default(),
        stopped: stop.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(rootscale_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(|error| Error::Config(format!("gRPC reflection: {error}")))?;
    let reflection_v1alpha =
        reflection().build_v1alpha().map_err(|error| Error::Config(format!("gRPC reflection: {error}")))?;
    let mut registry = Registry::default();
    crate::metrics::register(&mut registry, &state.tracer);
    registry.register_collector(Box::new(AgentCollector(state.clone())));
    for collector in extra_metrics {
        registry.register_collector(Box::new(ExtraCollector(collector)));
    }
    let registry = Arc::new(registry);
    let metrics = get(move || {
        let registry = registry.clone();
        async move {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &registry) {
                Ok(()) => ([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                    .into_response(),
                Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
    });
    let routes = Routes::new(neighbor)
        .add_service(advisor)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .into_axum_router()
        .route("/metrics", metrics)
        .layer(axum::middleware::from_fn_with_state(state.clone(), refused::refuse_undecodable));
    let mut server = Server::builder().accept_http1(true).concurrency_limit_per_connection(MAX_CONCURRENT_CALLS);
    if let Some(tls) = &tls {
        server = server.tls_config(tls.server()).map_err(|error| Error::Tls(error.to_string()))?;
    }
    let router = server.add_routes(Routes::from(routes));
    // A neighbour's connection carries one report per window: keep it across three.
    let idle = connections::MIN_IDLE.max(Duration::from_millis(state.window_ms.saturating_mul(3)));
    let closed = state.clone();
    let incoming =
        connections::incoming(listener, idle, Arc::new(move |reason| closed.metrics.closed_connection(reason)));
    Ok(async move {
        for service in SERVED {
            health_reporter.set_service_status(service, tonic_health::ServingStatus::Serving).await;
        }
        let signal = async move {
            crate::agent::stop_requested(&mut stop).await;
        };
        if let Err(error) = router.serve_with_incoming_shutdown(incoming, signal).await {
            tracing::error!(%error, "the agent's gRPC server stopped");
        }
    })
}
