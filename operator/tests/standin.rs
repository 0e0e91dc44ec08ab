//! The operator's whole loop over HTTP against an in-process stand-in of the Kubernetes API (`support`), whose
//! Pods point at real agents on loopback: two real services, svc-a → svc-b, with a worker pool in svc-b too small
//! for the load. Only svc-b's `/scale` may be patched; the ScalingDecisions must say root-cause and delegated.
//! Untested against a real cluster.

#[path = "../../dashboard/tests/support/browser.rs"]
mod browser;
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rootscale_operator::{
    agents::AgentClient,
    controller::reconcile::OperatorConfig,
    run::{RunConfig, run_until},
};
use serde_json::{Value, json};
use support::{
    ApiServer,
    shop::{Service, deployment, load, pod, scale_patches, service},
};

/// svc-a → svc-b with their agents, their Deployments (svc-b's with `b_annotations`) and Pods in the stand-in,
/// and load on svc-a until the returned deadline: svc-b serves 50 requests/s (one slot, 20 ms); 100 arrive.
async fn shop(b_annotations: &[(&str, &str)]) -> (Service, Service, ApiServer, Instant) {
    shop_for(b_annotations, Duration::from_secs(20)).await
}

/// [`shop`] with load for `load_for`.
async fn shop_for(b_annotations: &[(&str, &str)], load_for: Duration) -> (Service, Service, ApiServer, Instant) {
    let b = service("svc-b", 1, None).await;
    let a = service("svc-a", 64, Some(b.addr)).await;
    let api = ApiServer::start().await;
    api.create("deployments", deployment("svc-a", a.agent.local_addr().port(), &[("slo-latency", "100ms")]));
    api.create("deployments", deployment("svc-b", b.agent.local_addr().port(), b_annotations));
    api.create("pods", pod("svc-a"));
    api.create("pods", pod("svc-b"));
    let deadline = Instant::now() + load_for;
    load(a.addr, 100.0, deadline);
    (a, b, api, deadline)
}

/// The operator's settings for these tests: namespace `shop`, a 1 s resync.
fn config(leader_election: Option<(String, String)>, dashboard_addr: Option<std::net::SocketAddr>) -> RunConfig {
    RunConfig {
        namespaces: vec!["shop".into()],
        http_addr: "127.0.0.1:0".parse().unwrap(),
        operator: OperatorConfig {
            resync: Duration::from_secs(1),
            agents: AgentClient::new(Duration::from_millis(800)).with_mesh_keys(support::shop::mesh_keys()),
            ..OperatorConfig::default()
        },
        leader_election,
        dashboard_addr,
        lease_duration: rootscale_operator::leadership::DEFAULT_LEASE_DURATION,
    }
}

/// One operator (no leader election) against `api`.
fn start_operator(
    api: &ApiServer,
    dashboard_addr: Option<std::net::SocketAddr>,
) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<Result<(), rootscale_operator::Error>>) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let config = config(None, dashboard_addr);
    (stop, tokio::spawn(run_until(api.client(), config, stopped)))
}

async fn scenario(b_mode: &str) -> (ApiServer, Value, Value) {
    let (a, b, api, deadline) = shop(&[("mode", b_mode)]).await;
    let (stop, operator) = start_operator(&api, None);
    // Wait until svc-b's decision says it wants more replicas.
    let mut b_status = Value::Null;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        b_status = api.get("scalingdecisions", "shop", "svc-b").map(|d| d["status"].clone()).unwrap_or(Value::Null);
        if b_status["verdict"] == "root-cause"
            && b_status["history"].as_array().is_some_and(|h| h.iter().any(|e| e["toReplicas"].as_u64() > Some(1)))
        {
            break;
        }
    }
    let a_status = api.get("scalingdecisions", "shop", "svc-a").map(|d| d["status"].clone()).unwrap_or(Value::Null);
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), operator).await;
    a.agent.shutdown(Duration::from_millis(200)).await;
    b.agent.shutdown(Duration::from_millis(200)).await;
    (api, a_status, b_status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_bottleneck_is_scaled_and_the_decisions_say_why() {
    let (api, a_status, b_status) = scenario("enforce").await;
    assert_eq!(b_status["verdict"], "root-cause", "svc-b: {b_status:#}");
    assert_eq!(a_status["verdict"], "delegated", "svc-a: {a_status:#}");
    assert_eq!(a_status["suspect"], "svc-b", "svc-a: {a_status:#}");
    let patches = scale_patches(&api, "svc-b");
    assert!(!patches.is_empty(), "svc-b's /scale was never patched");
    // The first step is bounded by HPA's default scale-up policy from 1 replica (at most 5).
    let first = patches[0]["spec"]["replicas"].as_u64().unwrap();
    assert!((2..=5).contains(&first), "svc-b scaled to {first}");
    assert!(scale_patches(&api, "svc-a").is_empty(), "svc-a's /scale must not be patched");
    // (The stand-in starts no pods, so svc-b stays overloaded and later reconciles may ask for more.)
    let last = patches.last().unwrap()["spec"]["replicas"].as_u64();
    assert_eq!(api.get("deployments", "shop", "svc-b").unwrap()["spec"]["replicas"].as_u64(), last);
    let events = api.list("events");
    assert!(
        events.iter().any(|e| e["reason"] == "SuccessfulRescale" && e["regarding"]["name"] == "svc-b"),
        "{events:#?}"
    );
    // The ScalingDecision is owned by its Deployment, so it goes when the Deployment goes.
    let decision = api.get("scalingdecisions", "shop", "svc-b").unwrap();
    assert_eq!(decision["metadata"]["ownerReferences"][0]["name"], "svc-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_decision_is_applied_within_a_window_not_at_the_next_resync() {
    let b = service("svc-b", 1, None).await;
    let a = service("svc-a", 64, Some(b.addr)).await;
    let api = ApiServer::start().await;
    api.create("deployments", deployment("svc-a", a.agent.local_addr().port(), &[("slo-latency", "100ms")]));
    api.create("deployments", deployment("svc-b", b.agent.local_addr().port(), &[]));
    api.create("pods", pod("svc-a"));
    api.create("pods", pod("svc-b"));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut config = config(None, None);
    // After the first reconciles, the next resync comes only after the test.
    config.operator.resync = Duration::from_secs(120);
    let operator = tokio::spawn(run_until(api.client(), config, stopped));
    // The first reconciles, on idle agents, write the decisions (and give svc-a its SLO).
    let first = Instant::now() + Duration::from_secs(10);
    while ["svc-a", "svc-b"].iter().any(|name| api.get("scalingdecisions", "shop", name).is_none()) {
        assert!(Instant::now() < first, "no first reconcile");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let loaded = Instant::now();
    let deadline = loaded + Duration::from_secs(15);
    load(a.addr, 100.0, deadline);
    while scale_patches(&api, "svc-b").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = loaded.elapsed();
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), operator).await;
    a.agent.shutdown(Duration::from_millis(200)).await;
    b.agent.shutdown(Duration::from_millis(200)).await;
    assert!(!scale_patches(&api, "svc-b").is_empty(), "svc-b was never scaled in {after:?}");
    // Windows of 1 s: the overload shows in the first full one, the second confirms it, its push reconciles at
    // once — within a few windows of the load, where the resync would have taken 120 s.
    assert!(after < Duration::from_secs(6), "svc-b was scaled only after {after:?}");
    assert!(scale_patches(&api, "svc-a").is_empty(), "svc-a's /scale must not be patched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommend_mode_records_decisions_and_never_patches_scale() {
    let (api, _, b_status) = scenario("recommend").await;
    assert_eq!(b_status["verdict"], "root-cause", "svc-b: {b_status:#}");
    assert_eq!(b_status["mode"], "recommend");
    assert!(b_status["desiredReplicas"].as_u64() > Some(1), "{b_status:#}");
    assert!(scale_patches(&api, "svc-b").is_empty() && scale_patches(&api, "svc-a").is_empty());
    assert_eq!(api.get("deployments", "shop", "svc-b").unwrap()["spec"]["replicas"].as_u64(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_operators_only_the_leader_scales() {
    let (a, b, api, deadline) = shop(&[]).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut operators = Vec::new();
    for identity in ["operator-1", "operator-2"] {
        let config = config(Some(("shop".into(), identity.into())), None);
        operators.push(tokio::spawn(run_until(api.client(), config, stopped.clone())));
    }
    while Instant::now() < deadline && scale_patches(&api, "svc-b").is_empty() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Give the follower several resyncs in which it must not act.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Read the holder before stopping: the leader releases the Lease when it shuts down.
    let leases = api.list("leases");
    assert_eq!(leases.len(), 1, "{leases:#?}");
    let holder = leases[0]["spec"]["holderIdentity"].as_str().unwrap_or_default().to_string();
    assert!(holder == "operator-1" || holder == "operator-2", "{leases:#?}");
    let _ = stop.send(true);
    for operator in operators {
        let _ = tokio::time::timeout(Duration::from_secs(5), operator).await;
    }
    assert!(!scale_patches(&api, "svc-b").is_empty(), "nobody scaled");
    let rescales: Vec<Value> = api.list("events").into_iter().filter(|e| e["reason"] == "SuccessfulRescale").collect();
    assert!(!rescales.is_empty());
    for event in &rescales {
        assert_eq!(event["reportingInstance"].as_str(), Some(holder.as_str()), "a rescale by the follower: {event:#}");
    }
    // Every API call made is on the list the chart's RBAC grants, and every listed call was made (or is rare).
    use rootscale_operator::rbac::{API_CALLS, RARE_CALLS, classify};
    let listed: std::collections::BTreeSet<(String, String, String)> =
        API_CALLS.iter().map(|(g, r, v, _)| (g.to_string(), r.to_string(), v.to_string())).collect();
    let mut made = std::collections::BTreeSet::new();
    for request in api.log() {
        let call = classify(&request.method, &request.path).unwrap_or_else(|| panic!("unclassified {request:?}"));
        assert!(listed.contains(&call), "the operator made {call:?}, which RBAC does not grant: {request:?}");
        made.insert(call);
    }
    // A server-side apply that creates needs `create` as well as `patch`.
    made.insert(("rootscale.dev".into(), "scalingdecisions".into(), "create".into()));
    for call in &listed {
        let rare = RARE_CALLS.iter().any(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()) == *call);
        assert!(made.contains(call) || rare, "RBAC grants {call:?}, which the operator never made");
    }
    a.agent.shutdown(Duration::from_millis(200)).await;
    b.agent.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_deployments_the_root_cause_and_the_decision_in_a_browser() {
    let (a, b, api, deadline) = shop(&[]).await;
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (stop, operator) = start_operator(&api, Some(addr));
    // The data first, over HTTP: svc-b the root cause, svc-a delegating to it, svc-b's rescale on the timeline.
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut state = Value::Null;
    let ready = |state: &Value| {
        let frame = state["frames"].as_array().and_then(|f| f.last()).cloned().unwrap_or(Value::Null);
        let verdict = |name: &str| {
            frame["services"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == name))
                .map(|s| s["verdict"].clone())
        };
        verdict("svc-b") == Some(json!("root-cause"))
            && verdict("svc-a") == Some(json!("delegated"))
            && state["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["kind"] == "scale" && e["service"] == "svc-b"))
    };
    while Instant::now() < deadline && !ready(&state) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Ok(response) = client.get(format!("http://{addr}/api/state").parse().unwrap()).await {
            let body = response.into_body().collect().await.unwrap().to_bytes();
            state = serde_json::from_slice(&body).unwrap_or(Value::Null);
        }
    }
    assert!(ready(&state), "{state:#}");
    let frame = state["frames"].as_array().unwrap().last().unwrap();
    assert_eq!(frame["path"], json!([["svc-a", "svc-b"]]), "{frame:#}");
    assert_eq!(frame["edges"][0]["from"], "svc-a", "{frame:#}");
    assert_eq!(frame["entries"], json!(["svc-a"]));
    // Then the page, in a browser, while it updates live.
    let browser = browser::Browser::start().await;
    browser.open(&format!("http://{addr}/")).await;
    let updates = browser.run("return Number(document.body.dataset.updates);").await.as_u64().unwrap_or(0);
    let shown = browser
        .wait_for(
            &format!(
                "Number(document.body.dataset.updates) > {updates} \
                 && document.querySelector('g.node[data-service=\"svc-b\"][data-verdict=\"root-cause\"]') \
                 && document.querySelector('g.edge.path[data-from=\"svc-a\"][data-to=\"svc-b\"]') \
                 && document.querySelector('#timeline li[data-kind=\"scale\"][data-service=\"svc-b\"]')"
            ),
            "document.getElementById('graph').outerHTML + document.getElementById('timeline').outerHTML",
            Duration::from_secs(20),
        )
        .await;
    browser.screenshot(&browser::screenshot_path("dashboard-operator")).await;
    browser.close().await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), operator).await;
    a.agent.shutdown(Duration::from_millis(200)).await;
    b.agent.shutdown(Duration::from_millis(200)).await;
    shown.unwrap();
}

/// Plays the Deployment controller for `name` until `until`: its Pods follow its replica count, every one of them
/// ready on 127.0.0.1 (so all are answered by the service's one real agent, which stays overloaded).
fn pods_follow_replicas(api: ApiServer, name: &'static str, until: Instant) {
    tokio::spawn(async move {
        while Instant::now() < until {
            let replicas =
                api.get("deployments", "shop", name).and_then(|d| d["spec"]["replicas"].as_u64()).unwrap_or(1);
            for i in 0..replicas {
                let pod_name = format!("{name}-{i}");
                if api.get("pods", "shop", &pod_name).is_none() {
                    api.create(
                        "pods",
                        json!({"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": pod_name, "namespace": "shop", "labels": {"app": name}},
                               "status": {"phase": "Running", "podIP": "127.0.0.1",
                                          "conditions": [{"type": "Ready", "status": "True"}]}}),
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Leader hand-over. The leader's Lease requests stop reaching the API while its other requests still pass — the
/// lease library keeps saying it leads, so only the fence stops it. Its lease expires and the other instance takes
/// over from the memory the old one left in the ScalingDecision's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_keeps_the_rate_limit_and_the_old_one_stops_writing_at_its_deadline() {
    const LEASE: Duration = Duration::from_secs(3);
    const PERIOD: Duration = Duration::from_secs(15);
    let (a, b, api, deadline) = shop_for(&[("max-replicas", "50")], Duration::from_secs(45)).await;
    pods_follow_replicas(api.clone(), "svc-b", deadline);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut operators = Vec::new();
    for identity in ["operator-1", "operator-2"] {
        let mut config = config(Some(("shop".into(), identity.into())), None);
        config.lease_duration = LEASE;
        operators.push(tokio::spawn(run_until(api.client_as(identity), config, stopped.clone())));
    }
    let scale_path = "/apis/apps/v1/namespaces/shop/deployments/svc-b/scale";
    let scales = |api: &ApiServer| -> Vec<support::Logged> {
        api.log().into_iter().filter(|r| r.method == "PATCH" && r.path.starts_with(scale_path)).collect()
    };
    while Instant::now() < deadline && scales(&api).is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = scales(&api).first().cloned().expect("svc-b was never scaled");
    let old = first.client.clone();
    let new = if old == "operator-1" { "operator-2" } else { "operator-1" };
    // From 1 replica HPA's default policy allows max(1 + 4, 1 × 2) = 5 per 15 s.
    let first_replicas = first.body["spec"]["replicas"].as_u64().unwrap();
    assert!((2..=5).contains(&first_replicas), "{first_replicas}");
    // Let the status with the engine's memory land, then cut the leader's Lease traffic.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    api.cut(&old, "/leases");
    let cut_at = Instant::now();
    tokio::time::sleep((first.at + PERIOD + Duration::from_secs(8)).saturating_duration_since(Instant::now())).await;
    let _ = stop.send(true);
    for operator in operators {
        let _ = tokio::time::timeout(Duration::from_secs(5), operator).await;
    }
    let log = api.log();
    let is_write = |r: &support::Logged| r.method != "GET" && !r.path.contains("/leases");
    // The old leader's deadline: its last Lease write that got through, plus the lease's duration.
    let last_renewal = log
        .iter()
        .filter(|r| r.client == old && r.path.contains("/leases") && r.method != "GET")
        .map(|r| r.at)
        .max()
        .expect("the old leader renewed its lease");
    let fence = last_renewal + LEASE;
    let late: Vec<String> = log
        .iter()
        .filter(|r| r.client == old && is_write(r) && r.at > fence)
        .map(|r| format!("{} {} ({:?} after its deadline)", r.method, r.path, r.at - fence))
        .collect();
    assert!(late.is_empty(), "the old leader wrote after its deadline: {late:#?}");
    // The other instance took over and acted.
    assert!(
        log.iter()
            .any(|r| r.client == new && is_write(r) && r.at > cut_at && r.path.contains("scalingdecisions/svc-b")),
        "{new} never took over"
    );
    // Within the period of the first scale-up nobody went past the policy's limit from 1 replica — the new leader
    // included, which a fresh engine would not have held (from 5 it would have doubled at once).
    let in_period: Vec<(String, u64)> = scales(&api)
        .iter()
        .filter(|r| r.at < first.at + PERIOD)
        .map(|r| (r.client.clone(), r.body["spec"]["replicas"].as_u64().unwrap()))
        .collect();
    assert!(in_period.iter().all(|(_, replicas)| *replicas <= 5), "{in_period:?}");
    // After the period the new leader scales on: the hold was the memory, not a lack of demand.
    let after: Vec<u64> = scales(&api)
        .iter()
        .filter(|r| r.client == new && r.at >= first.at + PERIOD)
        .map(|r| r.body["spec"]["replicas"].as_u64().unwrap())
        .collect();
    assert!(after.iter().any(|replicas| *replicas > first_replicas), "{new} never scaled after the period: {after:?}");
    a.agent.shutdown(Duration::from_millis(200)).await;
    b.agent.shutdown(Duration::from_millis(200)).await;
}

#[test]
fn the_stand_in_reads_set_based_selectors() {
    let pod = json!({"metadata": {"labels": {"app": "web", "tier": "api"}}});
    let cases = [
        ("app=web", true),
        ("app==web,tier=api", true),
        ("app!=web", false),
        ("tier in (api,db)", true),
        ("tier in (db)", false),
        ("tier notin (db, cache)", true),
        ("tier notin (api)", false),
        ("canary notin (yes)", true),
        ("app", true),
        ("!app", false),
        ("!canary,app in (web),tier", true),
        ("canary", false),
    ];
    for (selector, expected) in cases {
        assert_eq!(support::matches_selector(&pod, selector), expected, "{selector}");
    }
}

/// Readiness that changes: the pods' watch brings it, and only ready pods are asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_turns_unready_is_not_asked_until_it_is_ready_again() {
    let (a, b, api, deadline) = shop(&[]).await;
    let (stop, operator) = start_operator(&api, None);
    let active = |api: &ApiServer| -> (String, String) {
        let status = api.get("scalingdecisions", "shop", "svc-b").map(|d| d["status"].clone()).unwrap_or_default();
        let condition = status["conditions"]
            .as_array()
            .and_then(|conditions| conditions.iter().find(|c| c["type"] == "ScalingActive").cloned())
            .unwrap_or_default();
        (
            condition["reason"].as_str().unwrap_or("").to_string(),
            condition["message"].as_str().unwrap_or("").to_string(),
        )
    };
    let wait_for = |reason: &'static str| {
        let api = api.clone();
        async move {
            while Instant::now() < deadline && active(&api).0 != reason {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            active(&api)
        }
    };
    let (reason, message) = wait_for("ValidRecommendationFound").await;
    assert_eq!((reason.as_str(), message.as_str()), ("ValidRecommendationFound", "1 of 1 agents answered"));
    api.set_pod_ready("shop", "svc-b-0", false);
    let (reason, message) = wait_for("FailedGetAgentRecommendation").await;
    assert_eq!((reason.as_str(), message.as_str()), ("FailedGetAgentRecommendation", "no ready pods to ask"));
    api.set_pod_ready("shop", "svc-b-0", true);
    let (reason, _) = wait_for("ValidRecommendationFound").await;
    assert_eq!(reason, "ValidRecommendationFound");
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), operator).await;
    a.agent.shutdown(Duration::from_millis(200)).await;
    b.agent.shutdown(Duration::from_millis(200)).await;
}
