//! The agent's port: `Neighbor` and `Advisor` (behind the shared token when one is set), gRPC health and server
//! reflection, and HTTP `/metrics`, served by one tonic server, over TLS when configured.

use std::{future::Future, sync::Arc};

use axum::{http::header::CONTENT_TYPE, response::IntoResponse, routing::get};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};
use rootscale_proto::v1::{
    self as proto,
    advisor_server::{Advisor, AdvisorServer},
    neighbor_server::{Neighbor, NeighborServer},
};
use tokio::sync::watch;
use tonic::{
    Request, Response, Status,
    service::Routes,
    transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig, server::TcpIncoming},
};

use crate::{
    Error,
    agent::{
        config::TlsFiles,
        state::{Advice, AgentState},
    },
    decide::Slo,
    exchange::report::validate,
};

/// Messages larger than this are refused by tonic before they are decoded (`OUT_OF_RANGE`), so a flood of large
/// messages costs little memory; reports have their own, smaller limit (`MAX_REPORT_BYTES`), and one between the
/// two is refused with `INVALID_ARGUMENT`.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Concurrent calls per connection to the agent's port.
const MAX_CONCURRENT_CALLS: usize = 32;

/// TLS material, loaded once.
#[derive(Clone)]
pub(crate) struct Tls {
    identity: Identity,
    ca: Certificate,
    server_name: Option<String>,
}

impl Tls {
    pub fn load(files: &TlsFiles) -> Result<Self, Error> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|error| Error::Tls(format!("cannot read {}: {error}", path.display())))
        };
        Ok(Self {
            identity: Identity::from_pem(read(&files.cert)?, read(&files.key)?),
            ca: Certificate::from_pem(read(&files.ca)?),
            server_name: files.server_name.clone(),
        })
    }

    /// Mutual TLS toward other agents: verify them against the CA (by `server_name` when given, else by the
    /// address dialled) and present this agent's certificate.
    pub fn client(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(self.ca.clone()).identity(self.identity.clone());
        match &self.server_name {
            Some(name) => config.domain_name(name.clone()),
            None => config,
        }
    }

    /// Serve with this agent's certificate and require one signed by the CA from every caller.
    fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone()).client_ca_root(self.ca.clone())
    }
}

/// Checks `authorization: Bearer <token>` in constant time.
#[derive(Clone)]
struct Authenticate {
    expected: Option<Arc<[u8]>>,
    state: Arc<AgentState>,
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else { return Ok(request) };
        let given = request.metadata().get("authorization").map(|value| value.as_bytes()).unwrap_or_default();
        let given = given.strip_prefix(b"Bearer ").unwrap_or_default();
        let same = given.len() == expected.len()
            && given.iter().zip(expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same {
            Ok(request)
        } else {
            self.state.metrics.received("unauthenticated");
            Err(Status::unauthenticated("missing or wrong agent token"))
        }
    }
}

struct NeighborService(Arc<AgentState>);

#[tonic::async_trait]
impl Neighbor for NeighborService {
    async fn exchange(&self, request: Request<proto::NeighborReport>) -> Result<Response<proto::NeighborAck>, Status> {
        let report = request.into_inner();
        let valid = match validate(&report, self.0.window_ms) {
            Ok(valid) => valid,
            Err(error) => {
                self.0.metrics.received("invalid");
                tracing::debug!(%error, from = %report.from_service, "refused a report");
                return Err(Status::invalid_argument(error.to_string()));
            }
        };
        let window_id = valid.window_id;
        let (accepted, onward) = self.0.on_report(valid);
        if !onward.is_empty() {
            let state = self.0.clone();
            tokio::spawn(async move { state.send(onward).await });
        }
        Ok(Response::new(proto::NeighborAck { service: self.0.service.clone(), window_id, accepted }))
    }
}

struct AdvisorService(Arc<AgentState>);

fn advice(request: &proto::RecommendRequest) -> Result<Advice, Status> {
    let percentile = if request.slo_percentile == 0.0 { 95.0 } else { request.slo_percentile };
    if !(percentile.is_finite() && percentile > 0.0 && percentile <= 100.0) {
        return Err(Status::invalid_argument(format!("slo_percentile {} is not in (0, 100]", request.slo_percentile)));
    }
    let target = if request.target_utilization == 0.0 { 0.7 } else { request.target_utilization };
    if !(target.is_finite() && target > 0.0 && target <= 1.0) {
        return Err(Status::invalid_argument(format!(
            "target_utilization {} is not in (0, 1]",
            request.target_utilization
        )));
    }
    if request.slo_latency_us > crate::measure::headers::MAX_DURATION_US {
        return Err(Status::invalid_argument("slo_latency_us is absurd"));
    }
    if request.current_replicas > 100_000 {
        return Err(Status::invalid_argument("current_replicas is absurd"));
    }
    let stabilization_s =
        if request.scale_down_stabilization_s == 0 { 300 } else { request.scale_down_stabilization_s };
    Ok(Advice {
        slo: (request.slo_latency_us > 0).then_some(Slo { latency_us: request.slo_latency_us, percentile }),
        current_replicas: request.current_replicas.max(1),
        target_utilization: target,
        stabilization: std::time::Duration::from_secs(u64::from(stabilization_s.min(86_400))),
    })
}

#[tonic::async_trait]
impl Advisor for AdvisorService {
    async fn recommend(
        &self,
        request: Request<proto::RecommendRequest>,
    ) -> Result<Response<proto::RecommendResponse>, Status> {
        let advice = advice(request.get_ref())?;
        Ok(Response::new(self.0.advise(advice)))
    }

    async fn snapshot(&self, _: Request<proto::SnapshotRequest>) -> Result<Response<proto::SnapshotResponse>, Status> {
        Ok(Response::new(self.0.snapshot()))
    }
}

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

/// The server future, ready to spawn; it ends when `stop` turns true.
pub(crate) fn serve(
    state: Arc<AgentState>,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    tls: Option<Tls>,
    mut stop: watch::Receiver<bool>,
) -> Result<impl Future<Output = ()> + Send + 'static, Error> {
    let authenticate = Authenticate { expected: token.map(|t| Arc::from(t.into_bytes())), state: state.clone() };
    let neighbor = tonic::service::interceptor::InterceptedService::new(
        NeighborServer::new(NeighborService(state.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES),
        authenticate.clone(),
    );
    let advisor = tonic::service::interceptor::InterceptedService::new(
        AdvisorServer::new(AdvisorService(state.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES),
        authenticate,
    );
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rootscale_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| Error::Config(format!("gRPC reflection: {error}")))?;
    let mut registry = Registry::default();
    crate::metrics::register(&mut registry, &state.tracer);
    registry.register_collector(Box::new(AgentCollector(state.clone())));
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
        .add_service(reflection)
        .into_axum_router()
        .route("/metrics", metrics);
    let mut server = Server::builder().accept_http1(true).concurrency_limit_per_connection(MAX_CONCURRENT_CALLS);
    if let Some(tls) = &tls {
        server = server.tls_config(tls.server()).map_err(|error| Error::Tls(error.to_string()))?;
    }
    let router = server.add_routes(Routes::from(routes));
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Ok(async move {
        health_reporter.set_serving::<NeighborServer<NeighborService>>().await;
        let signal = async move {
            crate::agent::stop_requested(&mut stop).await;
        };
        if let Err(error) = router.serve_with_incoming_shutdown(incoming, signal).await {
            tracing::error!(%error, "the agent's gRPC server stopped");
        }
    })
}
