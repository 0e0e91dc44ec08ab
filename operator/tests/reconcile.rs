//! Request-level scenarios of one reconcile, in the style of kube-rs/controller-rs `fixtures.rs`: a `tower-test`
//! mock stands in for the API server and asserts every request (method, path, body) in order — and that no other
//! request comes; the watches' caches are filled by hand; the agents are real gRPC servers on loopback.

#[path = "support/advisor.rs"]
mod advisor;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response};
use k8s_openapi::api::{apps::v1::Deployment, autoscaling::v2::HorizontalPodAutoscaler, core::v1::Pod};
use kube::{
    Client,
    client::Body,
    runtime::{
        events::{Recorder, Reporter},
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use rootscale_operator::{
    agents::AgentClient,
    controller::{
        cache::Cache,
        reconcile::{Context, OperatorConfig, reconcile},
    },
    crd::ScalingDecision,
    leadership::Leadership,
};
use rootscale_proto::v1::{Decision, Evidence, RecommendResponse, Recommendation, Verdict, WaitKind, WaitPoint};
use serde_json::{Value, json};
use tower_test::mock::{Handle, pair};

use advisor::FixedAdvisor;

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

    /// What a first reconcile writes last: the ScalingDecision, then its status; returns the status apply.
    async fn records(&mut self) -> Value {
        self.expect_apply("/apis/rootscale.dev/v1alpha1/namespaces/shop/scalingdecisions/web?").await;
        self.records_status().await
    }

    /// The status apply alone (the ScalingDecision exists).
    async fn records_status(&mut self) -> Value {
        self.expect_apply("/apis/rootscale.dev/v1alpha1/namespaces/shop/scalingdecisions/web/status?").await
    }

    /// No request comes (the reconcile is over, or sends nothing more).
    async fn expect_nothing(&mut self) {
        if let Ok(Some((request, _))) = tokio::time::timeout(Duration::from_millis(300), self.0.next_request()).await {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
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

fn scale(replicas: u32) -> Value {
    scale_at(replicas, "41")
}

fn scale_at(replicas: u32, version: &str) -> Value {
    json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
           "metadata": {"name": "web", "namespace": "shop", "resourceVersion": version},
           "spec": {"replicas": replicas}, "status": {"replicas": replicas}})
}

/// The Deployment `shop/web` at `replicas` (resourceVersion 41), selecting `app=web`.
fn deployment_at(replicas: u32, annotations: &[(&str, &str)]) -> Arc<Deployment> {
    let annotations: serde_json::Map<String, Value> =
        annotations.iter().map(|(k, v)| (format!("rootscale.dev/{k}"), json!(v))).collect();
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "uid": "d-1", "resourceVersion": "41",
                         "annotations": annotations},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}}}
        }))
        .unwrap(),
    )
}

fn deployment(annotations: &[(&str, &str)]) -> Arc<Deployment> {
    deployment_at(2, annotations)
}

/// A pod of `web` (label `app=web`), Running, ready or not, started and ready an hour ago.
fn pod(name: &str, ip: &str, ready: bool) -> Pod {
    let an_hour_ago =
        (k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(1)).to_string();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
        "status": {"phase": "Running", "podIP": ip, "startTime": an_hour_ago,
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                                   "lastTransitionTime": an_hour_ago}]}
    }))
    .unwrap()
}

/// A store that has listed `objects`, and its writer for later changes.
fn listed<K>(objects: Vec<K>) -> (Store<K>, Writer<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    (store, writer)
}

/// The watches' caches as a test fills them.
struct Watches {
    pods: Writer<Pod>,
    decisions: Writer<ScalingDecision>,
    autoscalers: Writer<HorizontalPodAutoscaler>,
}

impl Watches {
    fn add_pod(&mut self, pod: Pod) {
        self.pods.apply_watcher_event(&watcher::Event::Apply(pod));
    }

    /// Stores the ScalingDecision as the API would after the status apply `applied` (its body).
    fn store_decision(&mut self, applied: &Value) {
        let mut object = applied.clone();
        object["metadata"] = json!({"name": "web", "namespace": "shop"});
        object["spec"] = json!({"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}});
        let decision: ScalingDecision = serde_json::from_value(object).unwrap();
        self.decisions.apply_watcher_event(&watcher::Event::Apply(decision));
    }

    fn add_autoscaler(&mut self, name: &str, target: &str) {
        let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
                     "maxReplicas": 5}
        }))
        .unwrap();
        self.autoscalers.apply_watcher_event(&watcher::Event::Apply(hpa));
    }
}

/// An agent that always gives `verdict` with `usage_ratio`, and `suspect` as the bottleneck.
async fn agent(verdict: Verdict, usage_ratio: f64, suspect: String) -> SocketAddr {
    FixedAdvisor::new(RecommendResponse {
        service: "web".into(),
        window_id: 1,
        decision: Some(Decision {
            verdict: verdict as i32,
            kind: "cpu".into(),
            bottleneck: Some(WaitPoint { service: suspect, from_service: String::new(), kind: WaitKind::Local as i32 }),
            delegated_to: vec![],
            evidence: Some(Evidence { percentile: 95.0, reason: "busy".into(), ..Default::default() }),
        }),
        recommendation: Some(Recommendation { usage_ratio, ..Default::default() }),
        observed_latency_us: 250_000,
        traffic: None,
    })
    .serve()
    .await
}

/// An agent that says root-cause at `usage_ratio` times its target.
async fn fixed_agent(usage_ratio: f64) -> SocketAddr {
    agent(Verdict::RootCause, usage_ratio, "web".into()).await
}

/// A context whose caches hold one ready pod of `web` (its agent on 127.0.0.1) and nothing else.
fn context() -> (Arc<Context>, ApiServerVerifier, Watches) {
    context_with(vec![pod("web-1", "127.0.0.1", true)])
}

fn context_with(pods: Vec<Pod>) -> (Arc<Context>, ApiServerVerifier, Watches) {
    let (service, handle) = pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let recorder = Recorder::new(client.clone(), Reporter { controller: "rootscale-operator".into(), instance: None });
    let (pod_store, pods) = listed(pods);
    let (decision_store, decisions) = listed(vec![]);
    let (autoscaler_store, autoscalers) = listed(vec![]);
    let context = Context {
        client,
        recorder,
        config: OperatorConfig { agents: AgentClient::new(Duration::from_millis(500)), ..OperatorConfig::default() },
        engines: Mutex::new(HashMap::new()),
        leader: Leadership::Always,
        metrics: Arc::default(),
        failures: Mutex::new(HashMap::new()),
        board: Arc::default(),
        cache: Cache { pods: vec![pod_store], decisions: vec![decision_store], autoscalers: vec![autoscaler_store] },
    };
    (Arc::new(context), ApiServerVerifier(handle), Watches { pods, decisions, autoscalers })
}

const SCALE: &str = "/apis/apps/v1/namespaces/shop/deployments/web/scale";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

#[tokio::test]
async fn a_root_cause_scales_the_deployment_by_the_rate_policy_and_records_it() {
    let agent = fixed_agent(9.0).await;
    let (ctx, mut api, _watches) = context();
    let port = agent.port().to_string();
    let deployment =
        deployment(&[("enabled", "true"), ("max-replicas", "20"), ("slo-latency", "200ms"), ("agent-port", &port)]);
    let reconcile = tokio::spawn(reconcile(deployment, ctx));
    // Nothing is read: the count and its resourceVersion come from the Deployment the controller holds. The one
    // ready pod runs at 9× its target: 9 replicas by HPA's formula; HPA's default scale-up from 2 allows
    // max(+4 pods, +100 %) = 6.
    let patch = api.expect("PATCH", SCALE, 200, scale(6)).await;
    assert_eq!(patch, json!({"metadata": {"resourceVersion": "41"}, "spec": {"replicas": 6}}));
    let event = api.expect("POST", EVENTS, 201, json!({})).await;
    assert_eq!(event["reason"], "SuccessfulRescale");
    assert!(event["note"].as_str().unwrap().starts_with("New size: 6; reason:"), "{event}");
    let object = api.expect_apply("/apis/rootscale.dev/v1alpha1/namespaces/shop/scalingdecisions/web?").await;
    assert_eq!(object["spec"]["targetRef"]["name"], "web");
    assert_eq!(object["metadata"]["ownerReferences"][0]["uid"], "d-1");
    let status = api.records_status().await;
    let status = &status["status"];
    assert_eq!((status["verdict"].as_str(), status["desiredReplicas"].as_u64()), (Some("root-cause"), Some(6)));
    assert_eq!(status["targets"], "250ms/200ms");
    assert_eq!(status["conditions"][2]["reason"], "ScaleUpLimit");
    reconcile.await.unwrap().expect("the reconcile succeeds");
    api.expect_nothing().await;
}

#[tokio::test]
async fn a_steady_deployment_costs_no_request() {
    let agent = fixed_agent(1.0).await;
    let (ctx, mut api, mut watches) = context();
    let port = agent.port().to_string();
    let annotations = [("enabled", "true"), ("agent-port", port.as_str())];
    // The first reconcile creates the ScalingDecision and its status; the watch brings it back.
    let first = tokio::spawn(reconcile(deployment(&annotations), ctx.clone()));
    let status = api.records().await;
    assert_eq!(status["status"]["desiredReplicas"], 2, "on target: no change");
    first.await.unwrap().expect("the reconcile succeeds");
    watches.store_decision(&status);
    // The next resyncs see the same: no read (caches), no write (nothing changed), no Event.
    for _ in 0..3 {
        let again = tokio::spawn(reconcile(deployment(&annotations), ctx.clone()));
        again.await.unwrap().expect("the reconcile succeeds");
        api.expect_nothing().await;
    }
}

#[tokio::test]
async fn a_scale_up_is_not_repeated_while_the_new_pods_are_not_ready() {
    let agent = fixed_agent(2.0).await;
    let (ctx, mut api, mut watches) = context();
    let port = agent.port().to_string();
    let annotations = [("enabled", "true"), ("max-replicas", "20"), ("agent-port", port.as_str())];
    // One ready pod at twice its target: 2 replicas.
    let first = tokio::spawn(reconcile(deployment_at(1, &annotations), ctx.clone()));
    let patch = api.expect("PATCH", SCALE, 200, scale(2)).await;
    assert_eq!(patch["spec"]["replicas"], 2);
    api.expect("POST", EVENTS, 201, json!({})).await;
    let status = api.records().await;
    first.await.unwrap().expect("the reconcile succeeds");
    watches.store_decision(&status);
    // The new pod is not ready yet, and the old one still runs at twice its target (it carries all the load). HPA
    // counts the unready pod as 0 %: (2 + 0) / 2 = 1.0, on target — no second doubling.
    watches.add_pod(pod("web-2", "127.0.0.2", false));
    let second = tokio::spawn(reconcile(deployment_at(2, &annotations), ctx.clone()));
    let status = api.records_status().await;
    assert_eq!(
        (status["status"]["currentReplicas"].as_u64(), status["status"]["desiredReplicas"].as_u64()),
        (Some(2), Some(2))
    );
    second.await.unwrap().expect("the reconcile succeeds");
    api.expect_nothing().await;
}

#[tokio::test]
async fn recommend_mode_records_the_decision_and_leaves_replicas_alone() {
    let agent = fixed_agent(4.0).await;
    let (ctx, mut api, _watches) = context();
    let port = agent.port().to_string();
    let deployment = deployment(&[("enabled", "true"), ("mode", "recommend"), ("agent-port", &port)]);
    let reconcile = tokio::spawn(reconcile(deployment, ctx));
    // No PATCH of /scale and no SuccessfulRescale: straight to the record.
    let status = api.records().await;
    let status = &status["status"];
    assert_eq!((status["mode"].as_str(), status["desiredReplicas"].as_u64()), (Some("recommend"), Some(4)));
    assert_eq!(status["history"][0]["applied"], false);
    reconcile.await.unwrap().expect("the reconcile succeeds");
    api.expect_nothing().await;
}

#[tokio::test]
async fn a_bad_annotation_leaves_the_deployment_alone_and_says_why_once() {
    let (ctx, mut api, mut watches) = context();
    let deployment = deployment(&[("enabled", "true"), ("max-replicas", "ten")]);
    let reconcile_once = tokio::spawn(reconcile(deployment.clone(), ctx.clone()));
    let event = api.expect("POST", EVENTS, 201, json!({})).await;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("InvalidAnnotation")));
    assert!(event["note"].as_str().unwrap().contains("rootscale.dev/max-replicas=\"ten\""), "{event}");
    let status = api.records().await;
    assert_eq!(status["status"]["conditions"][0]["type"], "ScalingActive");
    assert_eq!(status["status"]["conditions"][0]["status"], "False");
    assert_eq!(status["status"]["conditions"][0]["reason"], "InvalidAnnotation");
    reconcile_once.await.unwrap().expect("the reconcile succeeds");
    // Said once: the next resync neither repeats the Event nor rewrites the same status.
    watches.store_decision(&status);
    reconcile(deployment, ctx).await.expect("the reconcile succeeds");
    api.expect_nothing().await;
}

#[tokio::test]
async fn zero_replicas_disable_scaling_and_nothing_is_written_to_scale() {
    let agent = fixed_agent(9.0).await;
    let (ctx, mut api, _watches) = context();
    let port = agent.port().to_string();
    let reconcile = tokio::spawn(reconcile(deployment_at(0, &[("enabled", "true"), ("agent-port", &port)]), ctx));
    let status = api.records().await;
    let status = &status["status"];
    assert_eq!((status["verdict"].as_str(), status["desiredReplicas"].as_u64()), (Some("disabled"), Some(0)));
    let active = &status["conditions"][1];
    assert_eq!(
        (active["type"].as_str(), active["status"].as_str(), active["reason"].as_str()),
        (Some("ScalingActive"), Some("False"), Some("ScalingDisabled"))
    );
    reconcile.await.unwrap().expect("the reconcile succeeds");
    api.expect_nothing().await;
}

#[tokio::test]
async fn another_autoscaler_on_the_deployment_is_named_and_nothing_is_written_to_scale() {
    let agent = fixed_agent(9.0).await;
    let (ctx, mut api, mut watches) = context();
    watches.add_autoscaler("web-other", "api");
    watches.add_autoscaler("keda-hpa-web", "web");
    let port = agent.port().to_string();
    let deployment = deployment(&[("enabled", "true"), ("agent-port", &port)]);
    let first = tokio::spawn(reconcile(deployment.clone(), ctx.clone()));
    let event = api.expect("POST", EVENTS, 201, json!({})).await;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("ConflictingAutoscaler")));
    assert!(event["note"].as_str().unwrap().contains("shop/keda-hpa-web"), "{event}");
    let status = api.records().await;
    let able = &status["status"]["conditions"][0];
    assert_eq!(
        (able["type"].as_str(), able["status"].as_str(), able["reason"].as_str()),
        (Some("AbleToScale"), Some("False"), Some("ConflictingAutoscaler"))
    );
    first.await.unwrap().expect("the reconcile succeeds");
    // Said once.
    watches.store_decision(&status);
    reconcile(deployment, ctx).await.expect("the reconcile succeeds");
    api.expect_nothing().await;
}

#[tokio::test]
async fn unannotated_deployments_are_not_touched() {
    let (ctx, mut api, _watches) = context();
    let action = reconcile(deployment(&[]), ctx).await.unwrap();
    assert_eq!(format!("{action:?}"), format!("{:?}", kube::runtime::controller::Action::await_change()));
    api.expect_nothing().await;
}

#[tokio::test]
async fn a_conflicting_write_is_retried_on_fresh_state() {
    let agent = fixed_agent(9.0).await;
    let (ctx, mut api, _watches) = context();
    let port = agent.port().to_string();
    let deployment = deployment(&[("enabled", "true"), ("max-replicas", "20"), ("agent-port", &port)]);
    let reconcile = tokio::spawn(reconcile(deployment, ctx));
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                          "message": "the object has been modified"});
    let first = api.expect("PATCH", SCALE, 409, conflict).await;
    assert_eq!(first["metadata"]["resourceVersion"], "41");
    // Someone set 3 replicas meanwhile: read again, decide again (from 3: max(+4, +100 %) = 7), write again.
    api.expect("GET", SCALE, 200, scale_at(3, "42")).await;
    let second = api.expect("PATCH", SCALE, 200, scale_at(7, "43")).await;
    assert_eq!(second, json!({"metadata": {"resourceVersion": "42"}, "spec": {"replicas": 7}}));
    let event = api.expect("POST", EVENTS, 201, json!({})).await;
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
    let (ctx, _api, _watches) = context();
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
    let agent = fixed_agent(9.0).await;
    let (ctx, mut api, _watches) = context();
    let port = agent.port().to_string();
    let deployment = deployment(&[("enabled", "true"), ("paused", "true"), ("agent-port", &port)]);
    let reconcile = tokio::spawn(reconcile(deployment, ctx));
    // No PATCH of /scale: straight to the record, which says why.
    let status = api.records().await;
    let active = &status["status"]["conditions"][1];
    assert_eq!((active["status"].as_str(), active["reason"].as_str()), (Some("False"), Some("ScalingDisabled")));
    assert_eq!(status["status"]["history"][0]["applied"], false);
    reconcile.await.unwrap().expect("the reconcile succeeds");
}

#[tokio::test]
async fn an_ipv6_pod_address_is_dialled_in_brackets() {
    // An IPv4-mapped IPv6 address: written and dialled as IPv6 ([::ffff:127.0.0.1]:port), delivered to the agent
    // on 127.0.0.1 — so the test stays on loopback.
    let agent = fixed_agent(9.0).await;
    let (ctx, mut api, _watches) = context_with(vec![pod("web-1", "::ffff:127.0.0.1", true)]);
    let port = agent.port().to_string();
    let deployment = deployment(&[("enabled", "true"), ("max-replicas", "20"), ("agent-port", &port)]);
    let reconcile = tokio::spawn(reconcile(deployment, ctx));
    let patch = api.expect("PATCH", SCALE, 200, scale(6)).await;
    assert_eq!(patch["spec"]["replicas"], 6, "the agent answered");
    api.expect("POST", EVENTS, 201, json!({})).await;
    let status = api.records().await;
    assert_eq!(status["status"]["verdict"], "root-cause");
    reconcile.await.unwrap().expect("the reconcile succeeds");
}

#[tokio::test]
async fn an_agent_answering_a_megabyte_suspect_is_bounded() {
    let huge = "a".repeat(1 << 20);
    let agent = agent(Verdict::RootCause, 9.0, huge).await;
    let (ctx, mut api, _watches) = context();
    let port = agent.port().to_string();
    let deployment = deployment(&[("enabled", "true"), ("max-replicas", "20"), ("agent-port", &port)]);
    let reconcile = tokio::spawn(reconcile(deployment, ctx));
    api.expect("PATCH", SCALE, 200, scale(6)).await;
    let event = api.expect("POST", EVENTS, 201, json!({})).await;
    assert!(event.to_string().len() < 4096, "an Event of {} bytes", event.to_string().len());
    let status = api.records().await;
    assert_eq!(status["status"]["verdict"], "root-cause", "the answer itself is kept");
    assert!(status["status"].get("suspect").is_none(), "a megabyte is no service name");
    assert!(status.to_string().len() < 16_384, "a status of {} bytes", status.to_string().len());
    reconcile.await.unwrap().expect("the reconcile succeeds");
}

#[tokio::test]
async fn what_is_kept_for_a_deployment_goes_when_it_is_no_longer_managed() {
    let agent = fixed_agent(9.0).await;
    let (ctx, mut api, _watches) = context();
    let port = agent.port().to_string();
    let managed = deployment(&[("enabled", "true"), ("max-replicas", "20"), ("agent-port", &port)]);
    let first = tokio::spawn(reconcile(managed, ctx.clone()));
    api.expect("PATCH", SCALE, 200, scale(6)).await;
    api.expect("POST", EVENTS, 201, json!({})).await;
    api.records().await;
    first.await.unwrap().expect("the reconcile succeeds");
    assert!(ctx.engines.lock().unwrap().contains_key("shop/web"), "the engine's memory is kept between resyncs");
    // The annotation is removed: its engine goes at once, and nothing is asked or written.
    reconcile(deployment(&[("agent-port", &port)]), ctx.clone()).await.expect("the reconcile succeeds");
    assert!(ctx.engines.lock().unwrap().is_empty());
    api.expect_nothing().await;
    // A deleted Deployment is never reconciled again: the resync's prune drops what is kept for it.
    ctx.engines.lock().unwrap().insert("shop/gone".into(), Default::default());
    ctx.failures.lock().unwrap().insert("shop/gone".into(), 3);
    ctx.engines.lock().unwrap().insert("shop/kept".into(), Default::default());
    ctx.prune(|key| key == "shop/kept");
    assert_eq!(ctx.engines.lock().unwrap().keys().collect::<Vec<_>>(), ["shop/kept"]);
    assert!(ctx.failures.lock().unwrap().is_empty());
}
