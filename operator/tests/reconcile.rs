//! Request-level scenarios of one reconcile, in the style of kube-rs/controller-rs `fixtures.rs`: a `tower-test`
//! mock stands in for the API server and asserts every request (method, path, body) in order; the agents are
//! real gRPC servers on loopback.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Client,
    client::Body,
    runtime::events::{Recorder, Reporter},
};
use rootscale_operator::{
    agents::AgentClient,
    controller::reconcile::{Context, OperatorConfig, reconcile},
};
use rootscale_proto::v1::{
    Decision, Evidence, RecommendRequest, RecommendResponse, Recommendation, SnapshotRequest, SnapshotResponse,
    Verdict, WaitKind, WaitPoint,
    advisor_server::{Advisor, AdvisorServer},
};
use serde_json::{Value, json};
use tower_test::mock::{Handle, pair};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// Answers and checks the operator's API requests, one by one.
struct ApiServerVerifier(ApiHandle);

impl ApiServerVerifier {
    /// Expects the next request to be `method` on a path starting with `path`; returns its body and answers
    /// `status` with `response`.
    async fn expect(&mut self, method: &str, path: &str, status: u16, response: Value) -> Value {
        self.expect_with(method, path, status, |_| response).await
    }

    /// Like [`ApiServerVerifier::expect`], answering with the request's own object (as an apply does).
    async fn expect_apply(&mut self, path: &str) -> Value {
        self.expect_with("PATCH", path, 200, |body| {
            let mut object = body.clone();
            object["metadata"]["namespace"] = json!("shop");
            object["metadata"]["name"] = json!("web");
            if object.get("spec").is_none() {
                // A status apply carries no spec; the stored object has one.
                object["spec"] = json!({"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}});
            }
            object
        })
        .await
    }

    /// What every reconcile of a valid Deployment reads first: its /scale (answered with `scale`), its previous
    /// ScalingDecision (none) and its pods (one, whose agent is on loopback).
    async fn reads(&mut self, scale: Value) {
        self.expect("GET", "/apis/apps/v1/namespaces/shop/deployments/web/scale", 200, scale).await;
        self.expect("GET", "/apis/rootscale.dev/v1alpha1/namespaces/shop/scalingdecisions/web", 404, not_found()).await;
        self.expect("GET", "/api/v1/namespaces/shop/pods?&labelSelector=app%3Dweb", 200, pods("127.0.0.1")).await;
    }

    /// What every reconcile writes last: the ScalingDecision, then its status; returns the status apply.
    async fn records(&mut self) -> Value {
        self.expect_apply("/apis/rootscale.dev/v1alpha1/namespaces/shop/scalingdecisions/web?").await;
        self.expect_apply("/apis/rootscale.dev/v1alpha1/namespaces/shop/scalingdecisions/web/status?").await
    }

    async fn expect_with(
        &mut self,
        method: &str,
        path: &str,
        status: u16,
        respond: impl FnOnce(&Value) -> Value,
    ) -> Value {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
            .unwrap_or_else(|| panic!("the client is gone; expected {method} {path}"));
        let uri = request.uri().to_string();
        assert_eq!(request.method().as_str(), method, "{uri}");
        assert!(uri.starts_with(path), "expected {method} {path}, got {uri}");
        let bytes = http_body_util::BodyExt::collect(request.into_body()).await.unwrap().to_bytes();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        let response =
            Response::builder().status(status).body(Body::from(serde_json::to_vec(&respond(&body)).unwrap())).unwrap();
        send.send_response(response);
        body
    }
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn scale(replicas: u32) -> Value {
    scale_at(replicas, "41")
}

fn scale_at(replicas: u32, version: &str) -> Value {
    json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
           "metadata": {"name": "web", "namespace": "shop", "resourceVersion": version},
           "spec": {"replicas": replicas}, "status": {"replicas": replicas}})
}

fn deployment(annotations: &[(&str, &str)]) -> Arc<Deployment> {
    let annotations: serde_json::Map<String, Value> =
        annotations.iter().map(|(k, v)| (format!("rootscale.dev/{k}"), json!(v))).collect();
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "uid": "d-1", "annotations": annotations},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}}}}
        }))
        .unwrap(),
    )
}

fn pods(agent_ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"}, "items": [{
        "metadata": {"name": "web-1", "namespace": "shop"},
        "status": {"phase": "Running", "podIP": agent_ip, "conditions": [{"type": "Ready", "status": "True"}]}
    }]})
}

/// An agent that always says root-cause and asks for `desired` replicas.
struct FixedAdvisor(u32);

#[tonic::async_trait]
impl Advisor for FixedAdvisor {
    async fn recommend(
        &self,
        _: tonic::Request<RecommendRequest>,
    ) -> Result<tonic::Response<RecommendResponse>, tonic::Status> {
        Ok(tonic::Response::new(RecommendResponse {
            service: "web".into(),
            window_id: 1,
            decision: Some(Decision {
                verdict: Verdict::RootCause as i32,
                kind: "cpu".into(),
                bottleneck: Some(WaitPoint {
                    service: "web".into(),
                    from_service: String::new(),
                    kind: WaitKind::Local as i32,
                }),
                delegated_to: vec![],
                evidence: Some(Evidence { percentile: 95.0, reason: "busy".into(), ..Default::default() }),
            }),
            recommendation: Some(Recommendation { desired_replicas: self.0, ..Default::default() }),
            observed_latency_us: 250_000,
            traffic: None,
        }))
    }

    async fn snapshot(
        &self,
        _: tonic::Request<SnapshotRequest>,
    ) -> Result<tonic::Response<SnapshotResponse>, tonic::Status> {
        Ok(tonic::Response::new(SnapshotResponse::default()))
    }
}

async fn fixed_agent(desired: u32) -> SocketAddr {
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let server = tonic::transport::Server::builder().add_service(AdvisorServer::new(FixedAdvisor(desired)));
    tokio::spawn(server.serve_with_incoming(incoming));
    addr
}

fn context() -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let recorder = Recorder::new(client.clone(), Reporter { controller: "rootscale-operator".into(), instance: None });
    let (_, leader) = tokio::sync::watch::channel(true);
    let context = Context {
        client,
        recorder,
        config: OperatorConfig { agents: AgentClient::new(Duration::from_millis(500)), ..OperatorConfig::default() },
        engines: Mutex::new(HashMap::new()),
        leader,
        metrics: Arc::default(),
        failures: Mutex::new(HashMap::new()),
        board: Arc::default(),
    };
    (Arc::new(context), ApiServerVerifier(handle))
}

#[tokio::test]
async fn a_root_cause_scales_the_deployment_by_the_rate_policy_and_records_it() {
    let agent = fixed_agent(9).await;
    let (ctx, mut api) = context();
    let port = agent.port().to_string();
    let deployment =
        deployment(&[("enabled", "true"), ("max-replicas", "20"), ("slo-latency", "200ms"), ("agent-port", &port)]);
    let reconcile = tokio::spawn(reconcile(deployment, ctx));
    api.reads(scale(2)).await;
    // HPA's default scale-up from 2: max(+4 pods, +100 %) = 6, not the 9 asked for.
    let patch = api.expect("PATCH", "/apis/apps/v1/namespaces/shop/deployments/web/scale", 200, scale(6)).await;
    assert_eq!(patch, json!({"metadata": {"resourceVersion": "41"}, "spec": {"replicas": 6}}));
    let event = api.expect("POST", "/apis/events.k8s.io/v1/namespaces/shop/events", 201, json!({})).await;
    assert_eq!(event["reason"], "SuccessfulRescale");
    assert!(event["note"].as_str().unwrap().starts_with("New size: 6; reason:"), "{event}");
    let object = api.expect_apply("/apis/rootscale.dev/v1alpha1/namespaces/shop/scalingdecisions/web?").await;
    assert_eq!(object["spec"]["targetRef"]["name"], "web");
    assert_eq!(object["metadata"]["ownerReferences"][0]["uid"], "d-1");
    let status = api.expect_apply("/apis/rootscale.dev/v1alpha1/namespaces/shop/scalingdecisions/web/status?").await;
    let status = &status["status"];
    assert_eq!((status["verdict"].as_str(), status["desiredReplicas"].as_u64()), (Some("root-cause"), Some(6)));
    assert_eq!(status["targets"], "250ms/200ms");
    assert_eq!(status["conditions"][2]["reason"], "ScaleUpLimit");
    reconcile.await.unwrap().expect("the reconcile succeeds");
}

#[tokio::test]
async fn recommend_mode_records_the_decision_and_leaves_replicas_alone() {
    let agent = fixed_agent(4).await;
    let (ctx, mut api) = context();
    let port = agent.port().to_string();
    let deployment = deployment(&[("enabled", "true"), ("mode", "recommend"), ("agent-port", &port)]);
    let reconcile = tokio::spawn(reconcile(deployment, ctx));
    api.reads(scale(2)).await;
    // No PATCH of /scale and no SuccessfulRescale: straight to the record.
    let status = api.records().await;
    let status = &status["status"];
    assert_eq!((status["mode"].as_str(), status["desiredReplicas"].as_u64()), (Some("recommend"), Some(4)));
    assert_eq!(status["history"][0]["applied"], false);
    reconcile.await.unwrap().expect("the reconcile succeeds");
}

#[tokio::test]
async fn a_bad_annotation_leaves_the_deployment_alone_and_says_why() {
    let (ctx, mut api) = context();
    let deployment = deployment(&[("enabled", "true"), ("max-replicas", "ten")]);
    let reconcile = tokio::spawn(reconcile(deployment, ctx));
    api.expect("GET", "/apis/apps/v1/namespaces/shop/deployments/web/scale", 200, scale(3)).await;
    api.expect("GET", "/apis/rootscale.dev/v1alpha1/namespaces/shop/scalingdecisions/web", 404, not_found()).await;
    let event = api.expect("POST", "/apis/events.k8s.io/v1/namespaces/shop/events", 201, json!({})).await;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("InvalidAnnotation")));
    assert!(event["note"].as_str().unwrap().contains("rootscale.dev/max-replicas=\"ten\""), "{event}");
    let status = api.records().await;
    assert_eq!(status["status"]["conditions"][0]["type"], "ScalingActive");
    assert_eq!(status["status"]["conditions"][0]["status"], "False");
    assert_eq!(status["status"]["conditions"][0]["reason"], "InvalidAnnotation");
    reconcile.await.unwrap().expect("the reconcile succeeds");
}

#[tokio::test]
async fn a_deployment_deleted_mid_reconcile_is_skipped() {
    let (ctx, mut api) = context();
    let deployment = deployment(&[("enabled", "true")]);
    let reconcile = tokio::spawn(reconcile(deployment, ctx));
    api.expect("GET", "/apis/apps/v1/namespaces/shop/deployments/web/scale", 404, not_found()).await;
    reconcile.await.unwrap().expect("nothing to do is not an error");
}

#[tokio::test]
async fn unannotated_deployments_are_not_touched() {
    let (ctx, _api) = context();
    let action = reconcile(deployment(&[]), ctx).await.unwrap();
    assert_eq!(format!("{action:?}"), format!("{:?}", kube::runtime::controller::Action::await_change()));
}

#[tokio::test]
async fn a_conflicting_write_is_retried_on_fresh_state() {
    let agent = fixed_agent(9).await;
    let (ctx, mut api) = context();
    let port = agent.port().to_string();
    let deployment = deployment(&[("enabled", "true"), ("max-replicas", "20"), ("agent-port", &port)]);
    let reconcile = tokio::spawn(reconcile(deployment, ctx));
    api.reads(scale_at(2, "41")).await;
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                          "message": "the object has been modified"});
    let first = api.expect("PATCH", "/apis/apps/v1/namespaces/shop/deployments/web/scale", 409, conflict).await;
    assert_eq!(first["metadata"]["resourceVersion"], "41");
    // Someone set 3 replicas meanwhile: read again, decide again (from 3: max(+4, +100 %) = 7), write again.
    api.expect("GET", "/apis/apps/v1/namespaces/shop/deployments/web/scale", 200, scale_at(3, "42")).await;
    let second =
        api.expect("PATCH", "/apis/apps/v1/namespaces/shop/deployments/web/scale", 200, scale_at(7, "43")).await;
    assert_eq!(second, json!({"metadata": {"resourceVersion": "42"}, "spec": {"replicas": 7}}));
    let event = api.expect("POST", "/apis/events.k8s.io/v1/namespaces/shop/events", 201, json!({})).await;
    assert!(event["note"].as_str().unwrap().starts_with("New size: 7;"), "{event}");
    let status = api.records().await;
    assert_eq!(
        (status["status"]["currentReplicas"].as_u64(), status["status"]["desiredReplicas"].as_u64()),
        (Some(3), Some(7))
    );
    reconcile.await.unwrap().expect("the reconcile succeeds");
}

#[tokio::test]
async fn server_errors_back_off_exponentially() {
    use kube::runtime::controller::Action;
    use rootscale_operator::controller::reconcile::error_policy;
    let (ctx, _api) = context();
    let deployment = deployment(&[("enabled", "true")]);
    let error = || rootscale_operator::Error::Target("HTTP 503".into());
    let backoffs: Vec<String> =
        (0..8).map(|_| format!("{:?}", error_policy(deployment.clone(), &error(), ctx.clone()))).collect();
    let expected: Vec<String> = [1u64, 2, 4, 8, 16, 32, 60, 60]
        .iter()
        .map(|s| format!("{:?}", Action::requeue(Duration::from_secs(*s))))
        .collect();
    assert_eq!(backoffs, expected);
}

#[tokio::test]
async fn a_paused_deployment_keeps_its_replicas() {
    let agent = fixed_agent(9).await;
    let (ctx, mut api) = context();
    let port = agent.port().to_string();
    let deployment = deployment(&[("enabled", "true"), ("paused", "true"), ("agent-port", &port)]);
    let reconcile = tokio::spawn(reconcile(deployment, ctx));
    api.reads(scale(2)).await;
    // No PATCH of /scale: straight to the record, which says why.
    let status = api.records().await;
    let active = &status["status"]["conditions"][1];
    assert_eq!((active["status"].as_str(), active["reason"].as_str()), (Some("False"), Some("ScalingDisabled")));
    assert_eq!(status["status"]["history"][0]["applied"], false);
    reconcile.await.unwrap().expect("the reconcile succeeds");
}
