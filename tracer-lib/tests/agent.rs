//! The agent's port, called as the operator, neighbours and tools call it: real gRPC over loopback.

mod common;

use std::{path::PathBuf, time::Duration};

use http_body_util::BodyExt;
use rootscale_proto::v1::{
    NeighborReport, RecommendRequest, SnapshotRequest, Verdict, advisor_client::AdvisorClient,
    neighbor_client::NeighborClient,
};
use rootscale_tracer::{Agent, agent::TlsFiles};
use tonic::{Code, transport::Channel};

async fn agent(service: &str) -> Agent {
    Agent::builder(service)
        .listen("127.0.0.1:0".parse().unwrap())
        .window(Duration::from_millis(200))
        .start()
        .await
        .expect("agent starts")
}

async fn channel(agent: &Agent) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", agent.local_addr())).unwrap().connect().await.unwrap()
}

fn report(agent: &Agent) -> NeighborReport {
    let window_id = agent.tracer().window_clock().window_id(std::time::Instant::now());
    NeighborReport {
        version: rootscale_proto::REPORT_VERSION,
        from_service: "svc-caller".into(),
        from_agent: "127.0.0.1:1".into(),
        window_id,
        window_ms: 200,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_metrics_are_served_on_the_agent_port() {
    let agent = agent("svc-a").await;
    let channel = channel(&agent).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "rootscale.v1.Neighbor".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses =
        reflection.server_reflection_info(futures_util::stream::iter([request])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["rootscale.v1.Neighbor", "rootscale.v1.Advisor", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} not in {names:?}");
    }

    // Let a window close, then scrape over plain HTTP/1.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let response =
        common::plain_client().get(format!("http://{}/metrics", agent.local_addr()).parse().unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    let text = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    for expected in [
        "rootscale_agent_decisions_total{service=\"svc-a\",verdict=\"insufficient-data\"}",
        "rootscale_window_requests{service=\"svc-a\"} 0",
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reports_and_bad_questions_are_refused_and_change_nothing() {
    let agent = agent("svc-a").await;
    let mut neighbor = NeighborClient::new(channel(&agent).await);
    let mut bad = report(&agent);
    bad.version = 9;
    assert_eq!(neighbor.exchange(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let mut nan = report(&agent);
    nan.delegation = Some(rootscale_proto::v1::Delegation { percentile: f64::NAN, ..Default::default() });
    let status = neighbor.exchange(nan).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("delegation.percentile"), "{}", status.message());
    let mut huge = report(&agent);
    huge.decision = Some(rootscale_proto::v1::Decision {
        evidence: Some(rootscale_proto::v1::Evidence {
            percentile: 95.0,
            reason: "x".repeat(50_000),
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(neighbor.exchange(huge).await.unwrap_err().code(), Code::InvalidArgument);
    assert!(agent.snapshot().neighbors.is_empty(), "no refused report may add a neighbour");

    // Well-formed reports from a far-away window, or from a service this one never exchanged traffic with, are
    // answered but not used.
    for window_id in [report(&agent).window_id - 100, u64::MAX, 0] {
        let mut far = report(&agent);
        far.window_id = window_id;
        assert!(!neighbor.exchange(far).await.unwrap().into_inner().accepted);
    }
    let ack = neighbor.exchange(report(&agent)).await.unwrap().into_inner();
    assert!(!ack.accepted, "svc-caller is not a neighbour");
    assert!(agent.snapshot().neighbors.is_empty());

    let mut advisor = AdvisorClient::new(channel(&agent).await);
    let bad = RecommendRequest { slo_percentile: 150.0, ..Default::default() };
    assert_eq!(advisor.recommend(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let bad = RecommendRequest { target_utilization: f64::NAN, ..Default::default() };
    assert_eq!(advisor.recommend(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let answer =
        advisor.recommend(RecommendRequest { current_replicas: 3, ..Default::default() }).await.unwrap().into_inner();
    let decision = answer.decision.unwrap();
    assert_eq!(decision.verdict(), Verdict::InsufficientData, "no traffic: {decision:?}");
    assert_eq!(answer.recommendation.unwrap().desired_replicas, 3, "never scale on missing data");
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_agent_calls_but_not_health() {
    let agent = Agent::builder("svc-a").listen("127.0.0.1:0".parse().unwrap()).token("s3cret").start().await.unwrap();
    let channel = channel(&agent).await;
    let mut advisor = AdvisorClient::new(channel.clone());
    assert_eq!(advisor.snapshot(SnapshotRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(SnapshotRequest {});
    wrong.metadata_mut().insert("authorization", "Bearer s3cre7".parse().unwrap());
    assert_eq!(advisor.snapshot(wrong).await.unwrap_err().code(), Code::Unauthenticated);
    let mut right = tonic::Request::new(SnapshotRequest {});
    right.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
    assert!(advisor.snapshot(right).await.is_ok());
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    assert!(health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.is_ok());
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_when_certificates_are_given() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let files = TlsFiles {
        cert: fixtures.join("agent.pem"),
        key: fixtures.join("agent.key"),
        ca: fixtures.join("ca.pem"),
        server_name: Some("localhost".into()),
    };
    let agent = Agent::builder("svc-a").listen("127.0.0.1:0".parse().unwrap()).tls(files).start().await.unwrap();
    let port = agent.local_addr().port();
    let read = |name: &str| std::fs::read(fixtures.join(name)).unwrap();
    let ca = tonic::transport::Certificate::from_pem(read("ca.pem"));
    let identity = tonic::transport::Identity::from_pem(read("agent.pem"), read("agent.key"));
    let connect = |tls: tonic::transport::ClientTlsConfig| async move {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}")).unwrap();
        endpoint.tls_config(tls).unwrap().connect().await
    };
    // Mutual TLS: a client with a certificate from the CA gets in.
    let tls =
        tonic::transport::ClientTlsConfig::new().ca_certificate(ca.clone()).identity(identity).domain_name("localhost");
    let channel = connect(tls).await.unwrap();
    assert!(AdvisorClient::new(channel).snapshot(SnapshotRequest {}).await.is_ok());
    // Without a client certificate it does not.
    let anonymous = tonic::transport::ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost");
    if let Ok(channel) = connect(anonymous).await {
        assert!(AdvisorClient::new(channel).snapshot(SnapshotRequest {}).await.is_err());
    }
    // Plain text is refused.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await;
    if let Ok(plain) = plain {
        assert!(AdvisorClient::new(plain).snapshot(SnapshotRequest {}).await.is_err());
    }
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_fail_with_a_message_naming_them() {
    let error = Agent::builder("bad name").start().await.err().unwrap();
    assert!(error.to_string().contains("bad name"), "{error}");
    let error = Agent::builder("svc-a").trigger_fraction(1.5).start().await.err().unwrap();
    assert!(error.to_string().contains("trigger fraction"), "{error}");
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = Agent::builder("svc-a").listen(taken.local_addr().unwrap()).start().await.err().unwrap();
    assert!(error.to_string().contains("cannot bind"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_report_to_each_other_over_mutual_tls_with_the_token() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let files = TlsFiles {
        cert: fixtures.join("agent.pem"),
        key: fixtures.join("agent.key"),
        ca: fixtures.join("ca.pem"),
        server_name: Some("localhost".into()),
    };
    let agent = Agent::builder("svc-b")
        .listen("127.0.0.1:0".parse().unwrap())
        .window(Duration::from_millis(200))
        .tls(files)
        .token("s3cret")
        .start()
        .await
        .unwrap();
    let read = |name: &str| std::fs::read(fixtures.join(name)).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
        .identity(tonic::transport::Identity::from_pem(read("agent.pem"), read("agent.key")))
        .domain_name("localhost");
    let address = agent.local_addr().to_string();
    // The same sender agents use for their reports.
    let sender = rootscale_tracer::exchange::sender::Sender::new(
        Duration::from_secs(2),
        Some("s3cret"),
        Some(tls.clone()),
        None,
    )
    .unwrap();
    sender.send(&address, report(&agent)).await.expect("a report over mutual TLS with the token is taken");
    let wrong_token =
        rootscale_tracer::exchange::sender::Sender::new(Duration::from_secs(2), Some("guess"), Some(tls), None)
            .unwrap();
    let error = wrong_token.send(&address, report(&agent)).await.unwrap_err();
    assert!(error.contains("Unauthenticated") || error.contains("token"), "{error}");
    let plain =
        rootscale_tracer::exchange::sender::Sender::new(Duration::from_secs(2), Some("s3cret"), None, None).unwrap();
    assert!(plain.send(&address, report(&agent)).await.is_err(), "plain text is refused");
    agent.shutdown(Duration::from_secs(1)).await;
}
