//! Trust (docs/DESIGN.md §1.6, SECURITY.md): nobody outside the mesh can steer an agent, read it, or speak for a
//! service — tried as outsiders would, against real agents and services on loopback. Every address in a header or
//! a report here is in 127.0.0.0/8: an agent dials what it believes.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rootscale_proto::v1::{
    Delegation, NeighborReport, RecommendRequest, SnapshotRequest, advisor_client::AdvisorClient,
    neighbor_client::NeighborClient,
};
use rootscale_tracer::{
    Agent, Tracer,
    agent::TlsFiles,
    decide::Verdict,
    exchange::sender::Sender,
    identity::{
        HeaderRole, KeyRing, MeshKeys, Rejection,
        peer::{OPERATOR_PROOF_METADATA, REPORT_PROOF_METADATA, operator_proof},
        proof::WINDOW_TAG_MODULUS,
    },
};
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpListener};
use tonic::{Code, transport::Channel};
use tower::{ServiceBuilder, ServiceExt};

const WINDOW: Duration = Duration::from_millis(200);
const MESH_KEY: &str = "test-mesh-key-0123456789abcdefghijklmnopqrstuvwxyz";

fn keys() -> Arc<KeyRing> {
    Arc::new(KeyRing::fixed(MeshKeys::parse(MESH_KEY).unwrap()))
}

/// A listening socket posing as an agent: it counts the connections made to it.
struct FakeAgent {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl FakeAgent {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Self { addr, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn builder(service: &str) -> rootscale_tracer::AgentBuilder {
    Agent::builder(service).listen("127.0.0.1:0".parse().unwrap()).window(WINDOW).token("s3cret")
}

/// An axum service behind `agent`'s server layer whose handler sleeps `work` (and calls `then`, if any).
async fn serve(agent: &Agent, work: Duration, then: Option<SocketAddr>) -> SocketAddr {
    let client = ServiceBuilder::new().layer(agent.client_layer()).service(common::plain_client());
    let app = Router::new()
        .route(
            "/",
            get(move || {
                let client = client.clone();
                async move {
                    tokio::time::sleep(work).await;
                    if let Some(callee) = then {
                        let request = http::Request::get(format!("http://{callee}/")).body(Empty::new()).unwrap();
                        if let Ok(response) = client.oneshot(request).await {
                            let _ = response.into_body().collect().await;
                        }
                    }
                    "ok"
                }
            }),
        )
        .layer(agent.server_layer());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Sends `rate` requests a second to `target` from outside (no rootscale layer) until `until`.
fn load(target: SocketAddr, rate: u32, until: Instant) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = common::plain_client();
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
        while Instant::now() < until {
            tick.tick().await;
            let client = client.clone();
            tokio::spawn(async move {
                let request = http::Request::get(format!("http://{target}/")).body(Empty::new()).unwrap();
                if let Ok(response) = client.request(request).await {
                    let _ = response.into_body().collect().await;
                }
            });
        }
    })
}

async fn get_with(target: SocketAddr, caller: &str) -> http::Response<hyper::body::Incoming> {
    let request = http::Request::get(format!("http://{target}/"))
        .header("rootscale-caller", caller)
        .body(Empty::<Bytes>::new())
        .unwrap();
    common::plain_client().request(request).await.unwrap()
}

fn window_now(tracer: &Tracer) -> u64 {
    tracer.window_clock().window_id(Instant::now())
}

const FORGED_PROOF: &str = "Zm9yZ2VkcHJvb2Zz";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_caller_cannot_name_an_address_to_dial_nor_read_timings() {
    let fake = FakeAgent::start().await;
    let agent = builder("svc-entry").mesh_keys(keys()).start().await.unwrap();
    let service = serve(&agent, Duration::from_millis(1), None).await;
    let (mut missing, mut forged) = (0, 0);
    // Six windows of outside requests naming the fake agent, without a proof and with a forged one.
    let until = Instant::now() + 6 * WINDOW;
    while Instant::now() < until {
        let bare = get_with(service, &format!("s=svc-fake;a={}", fake.addr)).await;
        assert!(bare.headers().get("rootscale-timing").is_none(), "timings answered to an outsider");
        missing += 1;
        // A forged proof for the window the service checks proofs against (the header names it by its id modulo
        // the tag's range). Not the clock's window: when the window closer is held up on a loaded machine, the
        // clock can run two windows ahead and the proof would be refused as stale instead.
        let tag = agent.tracer().proof_window() % WINDOW_TAG_MODULUS;
        let proofed = get_with(service, &format!("s=svc-fake;a={};i={tag};p={FORGED_PROOF}", fake.addr)).await;
        assert!(proofed.headers().get("rootscale-timing").is_none(), "timings answered to a forged proof");
        forged += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Two more windows for any report to be sent.
    tokio::time::sleep(2 * WINDOW).await;
    assert_eq!(fake.connections(), 0, "the agent dialled an address an outsider named");
    assert!(agent.snapshot().neighbors.is_empty(), "{:?}", agent.snapshot().neighbors);
    let rejections = agent.tracer().rejections().unwrap();
    assert_eq!(rejections.get(HeaderRole::Caller, Rejection::MissingProof), missing);
    assert_eq!(rejections.get(HeaderRole::Caller, Rejection::BadProof), forged);
    let metrics = metrics_text(&agent).await;
    let line = format!(
        "rootscale_unverified_headers_total{{service=\"svc-entry\",header=\"rootscale-caller\",reason=\"missing_proof\"}} {missing}"
    );
    assert!(metrics.contains(&line), "missing {line}");

    // A member with the key is believed: its agent is dialled, and it reads timings.
    let member_agent = FakeAgent::start().await;
    let member = Tracer::builder("svc-member")
        .agent_addr(member_agent.addr.to_string())
        .window(WINDOW)
        .mesh_keys(keys())
        .build()
        .unwrap();
    let client = ServiceBuilder::new().layer(member.client_layer()).service(common::plain_client());
    let until = Instant::now() + 3 * WINDOW;
    let mut timed = 0;
    while Instant::now() < until {
        let request = http::Request::get(format!("http://{service}/")).body(Empty::<Bytes>::new()).unwrap();
        let response = client.clone().oneshot(request).await.unwrap();
        timed += usize::from(response.headers().contains_key("rootscale-timing"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(2 * WINDOW).await;
    assert!(timed > 0, "a member gets timings");
    assert!(member_agent.connections() > 0, "a member's agent is dialled");
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_mesh_key_the_same_outsider_is_dialled() {
    // The control for the test above: it can fail, and it shows what the key closes.
    let fake = FakeAgent::start().await;
    let agent = builder("svc-open").start().await.unwrap();
    let service = serve(&agent, Duration::from_millis(1), None).await;
    let until = Instant::now() + 4 * WINDOW;
    while Instant::now() < until {
        let response = get_with(service, &format!("s=svc-fake;a={}", fake.addr)).await;
        assert!(response.headers().contains_key("rootscale-timing"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(2 * WINDOW).await;
    assert!(fake.connections() > 0, "open mode dials what a caller names");
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_callee_cannot_make_the_agent_dial() {
    let fake = FakeAgent::start().await;
    // An uninstrumented server answering with timing headers that name the fake agent.
    let fake_addr = fake.addr;
    let rogue = Router::new().route(
        "/",
        get(move || async move {
            let window = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
                / WINDOW.as_millis();
            let forged = if window.is_multiple_of(2) {
                format!("v=1;s=svc-rogue;t=5000;w=4000;k=l;at=svc-rogue;a={fake_addr}")
            } else {
                let tag = window as u64 % WINDOW_TAG_MODULUS;
                format!("v=1;s=svc-rogue;t=5000;w=4000;k=l;at=svc-rogue;a={fake_addr};i={tag};p={FORGED_PROOF}")
            };
            ([("rootscale-timing", forged)], "ok")
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, rogue).await });
    let agent = builder("svc-caller").mesh_keys(keys()).start().await.unwrap();
    let service = serve(&agent, Duration::from_millis(1), Some(rogue_addr)).await;
    load(service, 100, Instant::now() + 6 * WINDOW).await.unwrap();
    tokio::time::sleep(2 * WINDOW).await;
    assert_eq!(fake.connections(), 0, "the agent dialled an address a callee named");
    let rejections = agent.tracer().rejections().unwrap();
    let refused = rejections.get(HeaderRole::Timing, Rejection::MissingProof)
        + rejections.get(HeaderRole::Timing, Rejection::BadProof)
        + rejections.get(HeaderRole::Timing, Rejection::StaleWindow);
    assert!(refused > 100, "every forged timing is refused and counted: {refused}");
    assert!(rejections.get(HeaderRole::Timing, Rejection::MissingProof) > 0);
    assert!(rejections.get(HeaderRole::Timing, Rejection::BadProof) > 0);
    // The rogue is measured as an uninstrumented callee, named after its address, with no agent.
    let window = agent.tracer().last_window().unwrap();
    assert!(window.stats.outbound.values().all(|edge| edge.callee_agents.is_empty()));
    assert!(!window.stats.outbound.keys().any(|callee| &**callee == "svc-rogue"), "the rogue's name was believed");
    agent.shutdown(Duration::from_secs(1)).await;
}

/// A report claiming to come from `from` (service, agent) for `window_id`, delegating to `to`.
fn delegation_report(from: (&str, &str), to: &str, window_id: u64) -> NeighborReport {
    NeighborReport {
        version: rootscale_proto::REPORT_VERSION,
        from_service: from.0.into(),
        from_agent: from.1.into(),
        window_id,
        window_ms: WINDOW.as_millis() as u32,
        edge: Some(rootscale_proto::v1::EdgeView {
            as_caller: Some(rootscale_proto::v1::OutboundEdge { callee: to.into(), calls: 50, ..Default::default() }),
            as_callee: None,
        }),
        delegation: Some(Delegation {
            percentile: 95.0,
            caller_total_us: 500_000,
            caller_slo_us: 100_000,
            remote_wait_us: 400_000,
            path: vec![from.0.into()],
            unserved_ratio: 1.0,
        }),
        ..Default::default()
    }
}

/// The verdicts `agent` reaches over the next `windows` windows.
async fn verdicts(agent: &Agent, windows: u32) -> Vec<Verdict> {
    let mut seen = Vec::new();
    let until = Instant::now() + windows * WINDOW;
    while Instant::now() < until {
        seen.push(agent.decision().verdict);
        tokio::time::sleep(WINDOW / 8).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reports_and_delegations_are_refused_and_change_no_verdict() {
    let back = builder("svc-back").mesh_keys(keys()).start().await.unwrap();
    let front = builder("svc-front").mesh_keys(keys()).start().await.unwrap();
    // svc-back has local work: a delegation would make it the root cause.
    let back_service = serve(&back, Duration::from_millis(20), None).await;
    let front_service = serve(&front, Duration::from_millis(1), Some(back_service)).await;
    let traffic = load(front_service, 100, Instant::now() + 16 * WINDOW);
    // svc-back learns svc-front's agent from verified caller headers.
    tokio::time::sleep(3 * WINDOW).await;
    let front_agent = front.local_addr().to_string();
    assert!(back.snapshot().neighbors.iter().any(|n| n.service == "svc-front" && n.agent == front_agent));
    // Not triggered: healthy, or idle (its CPU is low) — never a root cause of its own.
    let untouched = |verdicts: Vec<Verdict>| verdicts.iter().all(|v| matches!(v, Verdict::Healthy | Verdict::Idle));
    assert!(untouched(verdicts(&back, 2).await));

    // A stranger without the key speaks for svc-front, from svc-front's own address and from its own.
    let stranger = Sender::new(Duration::from_secs(1), Some("s3cret"), None, None).unwrap();
    let back_addr = back.local_addr().to_string();
    let mut unauthenticated = 0;
    for _ in 0..4 {
        let window = window_now(back.tracer());
        for from in [front_agent.as_str(), "127.0.0.1:1"] {
            for window_id in [window - 1, window] {
                let error =
                    stranger.send(&back_addr, delegation_report(("svc-front", from), "svc-back", window_id)).await;
                let error = error.unwrap_err();
                assert!(error.contains("no valid proof of membership"), "a report without proof was taken: {error}");
                unauthenticated += 1;
            }
        }
        // A forged MAC.
        let mut neighbor = NeighborClient::new(channel(&back).await);
        let mut request = tonic::Request::new(delegation_report(("svc-front", &front_agent), "svc-back", window));
        request.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
        request.metadata_mut().insert(REPORT_PROOF_METADATA, "0f".repeat(32).parse().unwrap());
        assert_eq!(neighbor.exchange(request).await.unwrap_err().code(), Code::Unauthenticated);
        unauthenticated += 1;
        tokio::time::sleep(WINDOW / 2).await;
    }
    assert!(untouched(verdicts(&back, 2).await), "a forged delegation was acted on");
    let metrics = metrics_text(&back).await;
    let line = format!(
        "rootscale_agent_reports_received_total{{service=\"svc-back\",result=\"unauthenticated\"}} {unauthenticated}"
    );
    assert!(metrics.contains(&line), "missing {line} in\n{metrics}");

    // A member with the key, from an agent svc-back never saw for svc-front: refused too.
    let member = Sender::new(Duration::from_secs(1), Some("s3cret"), None, Some(keys())).unwrap();
    let window = window_now(back.tracer());
    member.send(&back_addr, delegation_report(("svc-front", "127.0.0.1:1"), "svc-back", window)).await.unwrap();
    assert!(untouched(verdicts(&back, 2).await), "an unverified agent was believed");
    assert!(metrics_text(&back).await.contains("result=\"unverified_agent\"} 1"));

    // The control: the same delegation, proved and from svc-front's agent, is acted on.
    let mut acted = false;
    for _ in 0..4 {
        let window = window_now(back.tracer());
        member.send(&back_addr, delegation_report(("svc-front", &front_agent), "svc-back", window)).await.unwrap();
        if verdicts(&back, 1).await.contains(&Verdict::RootCause) {
            acted = true;
            break;
        }
    }
    assert!(acted, "a member's delegation made no difference: the refusals above prove nothing");
    traffic.abort();
    back.shutdown(Duration::from_secs(1)).await;
    front.shutdown(Duration::from_secs(1)).await;
}

async fn channel(agent: &Agent) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", agent.local_addr())).unwrap().connect().await.unwrap()
}

async fn metrics_text(agent: &Agent) -> String {
    let uri = format!("http://{}/metrics", agent.local_addr()).parse().unwrap();
    let response = common::plain_client().get(uri).await.unwrap();
    String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

fn as_operator(request: RecommendRequest) -> tonic::Request<RecommendRequest> {
    let proof = operator_proof(&keys().current(), "Recommend", &prost::Message::encode_to_vec(&request));
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert(OPERATOR_PROOF_METADATA, proof);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_only_the_operator_asks_and_an_empty_question_erases_nothing() {
    // An entry whose requests take 40 ms against a configured SLO of 20 ms: root cause, from its configuration.
    let agent = Agent::builder("svc-entry")
        .listen("127.0.0.1:0".parse().unwrap())
        .window(WINDOW)
        .mesh_keys(keys())
        .slo(Duration::from_millis(20), 95.0)
        .start()
        .await
        .unwrap();
    let service = serve(&agent, Duration::from_millis(40), None).await;
    let traffic = load(service, 100, Instant::now() + 20 * WINDOW);
    tokio::time::sleep(2 * WINDOW).await;
    assert!(verdicts(&agent, 2).await.contains(&Verdict::RootCause));

    let mut advisor = AdvisorClient::new(channel(&agent).await);
    for request in [RecommendRequest::default(), RecommendRequest { slo_latency_us: 10_000_000, ..Default::default() }]
    {
        assert_eq!(advisor.recommend(request).await.unwrap_err().code(), Code::Unauthenticated);
    }
    assert_eq!(advisor.snapshot(SnapshotRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
    // A replayed proof for another question does not verify.
    let mut replayed = as_operator(RecommendRequest::default());
    *replayed.get_mut() = RecommendRequest { slo_latency_us: 10_000_000, ..Default::default() };
    assert_eq!(advisor.recommend(replayed).await.unwrap_err().code(), Code::Unauthenticated);
    assert!(verdicts(&agent, 3).await.iter().all(|v| *v == Verdict::RootCause), "an outsider changed the SLO");

    // The operator's empty question keeps the configured SLO.
    let answer = advisor.recommend(as_operator(RecommendRequest::default())).await.unwrap().into_inner();
    assert_eq!(answer.service, "svc-entry");
    assert!(verdicts(&agent, 3).await.iter().all(|v| *v == Verdict::RootCause), "an empty question erased the SLO");
    assert!(advisor.snapshot(authorised_snapshot()).await.is_ok());

    // The control: the operator's SLO of 10 s is kept, and later windows are healthy.
    let relaxed = RecommendRequest { slo_latency_us: 10_000_000, ..Default::default() };
    advisor.recommend(as_operator(relaxed)).await.unwrap();
    tokio::time::sleep(WINDOW).await;
    assert!(verdicts(&agent, 3).await.iter().all(|v| *v != Verdict::RootCause), "the operator's SLO was not kept");
    assert!(
        metrics_text(&agent)
            .await
            .contains("rootscale_agent_advisor_refused_total{service=\"svc-entry\",reason=\"unauthenticated\"} 4")
    );
    traffic.abort();
    agent.shutdown(Duration::from_secs(1)).await;
}

fn authorised_snapshot() -> tonic::Request<SnapshotRequest> {
    let proof = operator_proof(&keys().current(), "Snapshot", &prost::Message::encode_to_vec(&SnapshotRequest {}));
    let mut request = tonic::Request::new(SnapshotRequest {});
    request.metadata_mut().insert(OPERATOR_PROOF_METADATA, proof);
    request
}

/// A CA in a directory of its own; certificates as cert-manager writes them.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("rootscale-trust-{}-{:?}", std::process::id(), Instant::now()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "trust test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        Self { dir, ca }
    }

    /// A certificate for `name`, good for serving and calling.
    fn issue(&self, name: &str) -> TlsFiles {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        TlsFiles {
            cert: cert_path,
            key: key_path,
            ca: self.dir.join("ca.crt"),
            server_name: Some("rootscale-agent".into()),
        }
    }

    async fn client(&self, files: &TlsFiles, agent: &Agent) -> AdvisorClient<Channel> {
        let read = |path: &PathBuf| std::fs::read(path).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(&files.ca)))
            .identity(tonic::transport::Identity::from_pem(read(&files.cert), read(&files.key)))
            .domain_name("rootscale-agent");
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", agent.local_addr())).unwrap();
        AdvisorClient::new(endpoint.tls_config(tls).unwrap().connect().await.unwrap())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_a_member_question_shapes_its_answer_only() {
    let pki = Pki::new();
    // A healthy entry: 1 ms requests against a configured SLO of 10 s.
    let agent = Agent::builder("svc-entry")
        .listen("127.0.0.1:0".parse().unwrap())
        .window(WINDOW)
        .tls(pki.issue("rootscale-agent"))
        .slo(Duration::from_secs(10), 95.0)
        .start()
        .await
        .unwrap();
    let service = serve(&agent, Duration::from_millis(5), None).await;
    let traffic = load(service, 100, Instant::now() + 20 * WINDOW);
    tokio::time::sleep(2 * WINDOW).await;
    assert!(verdicts(&agent, 2).await.iter().all(|v| *v != Verdict::RootCause));

    // Another member of the mesh (a certificate from the same CA, not the operator's) asks with an SLO of 1 µs.
    let member = pki.client(&pki.issue("svc-other"), &agent).await;
    let strict = RecommendRequest { slo_latency_us: 1, current_replicas: 1, ..Default::default() };
    for _ in 0..3 {
        let answer = member.clone().recommend(strict.clone()).await.unwrap().into_inner();
        let verdict = answer.decision.unwrap().verdict;
        assert_eq!(verdict, rootscale_proto::v1::Verdict::RootCause as i32, "the answer follows the question");
        assert!(verdicts(&agent, 1).await.iter().all(|v| *v != Verdict::RootCause), "a member changed the SLO");
    }

    // The control: the operator's certificate (its DNS name is the operator identity) is heard.
    let operator = pki.client(&pki.issue("rootscale-operator"), &agent).await;
    operator.clone().recommend(strict.clone()).await.unwrap();
    tokio::time::sleep(WINDOW).await;
    assert!(verdicts(&agent, 2).await.iter().all(|v| *v == Verdict::RootCause), "the operator's SLO was not kept");
    traffic.abort();
    agent.shutdown(Duration::from_secs(1)).await;
}

/// A raw gRPC call: `body` is sent as is, so it can be anything.
async fn raw_grpc(agent: &Agent, path: &str, body: Vec<u8>) -> http::Response<hyper::body::Incoming> {
    let client = Client::builder(TokioExecutor::new()).http2_only(true).build_http::<Full<Bytes>>();
    let request = http::Request::post(format!("http://{}{path}", agent.local_addr()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", "Bearer s3cret")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    client.request(request).await.unwrap()
}

/// A gRPC frame: uncompressed, with `length` in its prefix and `payload` after it.
fn frame(length: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversize_messages_are_invalid_arguments_and_counted() {
    let agent = builder("svc-a").mesh_keys(keys()).start().await.unwrap();
    let garbage = [0xff_u8; 9];
    let cases = [
        ("/rootscale.v1.Neighbor/Exchange", frame(9, &garbage)),
        ("/rootscale.v1.Advisor/Recommend", frame(9, &garbage)),
        ("/rootscale.v1.Neighbor/Exchange", frame(300_000, &vec![0u8; 300_000])),
    ];
    for (path, body) in cases {
        let response = raw_grpc(&agent, path, body).await;
        let status = response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(status.as_deref(), Some("3"), "{path}: {:?}", response.headers());
    }
    let metrics = metrics_text(&agent).await;
    for line in [
        "rootscale_agent_refused_messages_total{service=\"svc-a\",reason=\"undecodable\"} 2",
        "rootscale_agent_refused_messages_total{service=\"svc-a\",reason=\"oversize\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    // A well-formed call still works afterwards.
    let snapshot = tonic::Request::new(SnapshotRequest {});
    let status = AdvisorClient::new(channel(&agent).await).snapshot(snapshot).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_only_the_preface_is_closed_and_counted() {
    let agent = builder("svc-a").start().await.unwrap();
    let mut stream = tokio::net::TcpStream::connect(agent.local_addr()).await.unwrap();
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let opened = Instant::now();
    let mut buffer = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a preface-only connection was still open after 30 s");
    let lived = opened.elapsed();
    assert!(lived >= Duration::from_secs(9), "closed after {lived:?}: before its 10 s to send a request");
    let metrics = metrics_text(&agent).await;
    let line = "rootscale_agent_connections_closed_total{service=\"svc-a\",reason=\"no_request\"} 1";
    assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_and_a_health_entry_for_every_service() {
    let agent = builder("svc-a").start().await.unwrap();
    let channel = channel(&agent).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in [
        "",
        "rootscale.v1.Neighbor",
        "rootscale.v1.Advisor",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
        let status = health.check(request).await.unwrap().into_inner().status;
        assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service:?}");
    }
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list over v1alpha");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "rootscale.v1.Advisor"), "{names:?}");
    agent.shutdown(Duration::from_secs(1)).await;
}
