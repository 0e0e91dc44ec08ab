//! Time to reconcile 1,000 annotated Deployments against the in-process stand-in of the Kubernetes API, with
//! every pod's agent stubbed by one fast in-process Advisor. Goal: all within one 15 s sync period on 2 cores.
//!
//! `cargo bench -p rootscale-operator --bench reconcile_1000 [-- <deployments>]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use rootscale_operator::{
    controller::reconcile::OperatorConfig,
    run::{RunConfig, run_until},
};
use rootscale_proto::v1::{
    Decision, RecommendRequest, RecommendResponse, Recommendation, SnapshotRequest, SnapshotResponse, Verdict,
    advisor_server::{Advisor, AdvisorServer},
};
use serde_json::json;

struct Healthy;

#[tonic::async_trait]
impl Advisor for Healthy {
    async fn recommend(
        &self,
        request: tonic::Request<RecommendRequest>,
    ) -> Result<tonic::Response<RecommendResponse>, tonic::Status> {
        let current = request.get_ref().current_replicas.max(1);
        Ok(tonic::Response::new(RecommendResponse {
            decision: Some(Decision { verdict: Verdict::Healthy as i32, ..Default::default() }),
            recommendation: Some(Recommendation { desired_replicas: current, ..Default::default() }),
            observed_latency_us: 12_000,
            ..Default::default()
        }))
    }

    async fn snapshot(
        &self,
        _: tonic::Request<SnapshotRequest>,
    ) -> Result<tonic::Response<SnapshotResponse>, tonic::Status> {
        Ok(tonic::Response::new(SnapshotResponse::default()))
    }
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1000);
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let agent_port = incoming.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder().add_service(AdvisorServer::new(Healthy)).serve_with_incoming(incoming),
    );
    let api = support::ApiServer::start().await;
    for i in 0..count {
        let name = format!("svc-{i:04}");
        api.create(
            "deployments",
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": name, "namespace": "bench", "annotations": {
                       "rootscale.dev/enabled": "true", "rootscale.dev/agent-port": agent_port.to_string(),
                       "rootscale.dev/slo-latency": "200ms"}},
                   "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                            "template": {"metadata": {"labels": {"app": name}}}}}),
        );
        api.create(
            "pods",
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": format!("{name}-0"), "namespace": "bench", "labels": {"app": name}},
                   "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let config = RunConfig {
        namespaces: vec!["bench".into()],
        http_addr: "127.0.0.1:0".parse().unwrap(),
        operator: OperatorConfig::default(),
        leader_election: None,
        dashboard_addr: None,
    };
    let started = Instant::now();
    let operator = tokio::spawn(run_until(api.client(), config, stopped));
    let mut done = 0;
    while started.elapsed() < Duration::from_secs(120) {
        done = api.list("scalingdecisions").iter().filter(|d| !d["status"]["verdict"].is_null()).count();
        if done >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), operator).await;
    println!(
        "{done} of {count} Deployments reconciled (ScalingDecision written) in {:.2} s: {:.0} per second; API requests served: {}",
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64(),
        api.log().len()
    );
}
