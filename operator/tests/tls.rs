//! The operator and the agents over mutual TLS, with certificates made at test time, everything on loopback: the
//! agents require the operator's client certificate, the operator checks theirs against the CA and the server
//! name. A Deployment is scaled end to end through such agents; an agent whose certificate comes from another CA,
//! or is not for the server name, is missing data and its Deployment is never scaled. Untested against a real
//! cluster.

mod support;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rootscale_operator::{
    agents::{AgentClient, Query, ask_all},
    controller::reconcile::OperatorConfig,
    engine::{Advice, Verdict},
    run::{RunConfig, run_until},
    tls::{AgentTls, AgentTlsFiles},
};
use rootscale_tracer::{Agent, agent::TlsFiles};
use serde_json::Value;
use support::{
    ApiServer,
    shop::{Service, deployment, load, pod, scale_patches, service_with},
};

/// The name every agent certificate holds, and the operator and the agents check.
const AGENT_NAME: &str = "rootscale-agent";

/// A CA in a directory of its own, issuing certificates as cert-manager would write them (`tls.crt`, `tls.key`,
/// `ca.crt`).
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rootscale-tls-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        Self { dir, ca }
    }

    /// A certificate for `names` (DNS names or IPs) with `usages`, written as `<stem>.crt` and `<stem>.key`.
    fn issue(&self, stem: &str, names: &[&str], usages: Vec<ExtendedKeyUsagePurpose>) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, stem);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = usages;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (self.dir.join(format!("{stem}.crt")), self.dir.join(format!("{stem}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// An agent's files: its certificate for `names` (server and client: it serves the operator and its
    /// neighbours, and calls its neighbours), this CA, and `AGENT_NAME` to check its neighbours by.
    fn agent(&self, stem: &str, names: &[&str]) -> TlsFiles {
        let usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let (cert, key) = self.issue(stem, names, usages);
        TlsFiles { cert, key, ca: self.dir.join("ca.crt"), server_name: Some(AGENT_NAME.into()) }
    }

    /// The operator's files: a client certificate (as `dnsNames: [rootscale-operator]`, client auth) and this CA.
    fn operator(&self, server_name: Option<&str>) -> AgentTlsFiles {
        let (cert, key) = self.issue("operator", &["rootscale-operator"], vec![ExtendedKeyUsagePurpose::ClientAuth]);
        AgentTlsFiles {
            ca: Some(self.dir.join("ca.crt")),
            cert: Some(cert),
            key: Some(key),
            server_name: server_name.map(str::to_string),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client(files: &AgentTlsFiles) -> AgentClient {
    AgentClient::new(Duration::from_millis(800)).with_tls(AgentTls::load(files).unwrap().unwrap())
}

fn query() -> Query {
    Query {
        namespace: "shop".into(),
        deployment: "checkout".into(),
        slo: Some((Duration::from_millis(200), 95.0)),
        target_utilization: 0.7,
        current_replicas: 2,
    }
}

async fn agent(name: &str, tls: Option<TlsFiles>, token: Option<&str>) -> Agent {
    let mut builder = Agent::builder(name).listen("127.0.0.1:0".parse().unwrap());
    if let Some(tls) = tls {
        builder = builder.tls(tls);
    }
    if let Some(token) = token {
        builder = builder.token(token);
    }
    builder.start().await.unwrap()
}

async fn ask(client: &AgentClient, agent: SocketAddr) -> Result<Advice, String> {
    let answers = ask_all(&[("checkout-0".to_string(), agent)], &query(), client).await;
    answers.into_iter().next().unwrap().advice
}

/// No traffic yet: an agent that answers says insufficient-data and keeps the current replicas.
const FIRST_ANSWER: Advice = Advice { verdict: Verdict::InsufficientData, usage_ratio: 0.0 };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_verifies_the_agents_and_presents_its_client_certificate() {
    let pki = Pki::new("ask");
    let rogue = Pki::new("rogue");
    let mutual = client(&pki.operator(Some(AGENT_NAME)));
    let good = agent("checkout", Some(pki.agent("good", &[AGENT_NAME])), None).await;
    assert_eq!(ask(&mutual, good.local_addr()).await, Ok(FIRST_ANSWER));

    // Another CA's certificate, though for the right name.
    let impostor = agent("checkout", Some(rogue.agent("impostor", &[AGENT_NAME])), None).await;
    let why = ask(&mutual, impostor.local_addr()).await.unwrap_err();
    assert!(why.contains("cannot reach") && why.contains("UnknownIssuer"), "{why}");
    // The right CA, another name.
    let misnamed = agent("checkout", Some(pki.agent("misnamed", &["someone-else"])), None).await;
    let why = ask(&mutual, misnamed.local_addr()).await.unwrap_err();
    assert!(why.contains("cannot reach") && why.contains("not valid for name"), "{why}");
    // An agent without TLS is not called in clear text.
    let plain = agent("checkout", None, None).await;
    assert!(ask(&mutual, plain.local_addr()).await.is_err());

    // The agent requires a client certificate from its CA: none (the CA alone, server-authenticated TLS), one
    // from another CA, or no TLS at all is refused.
    let server_only = client(&AgentTlsFiles { cert: None, key: None, ..pki.operator(Some(AGENT_NAME)) });
    let why = ask(&server_only, good.local_addr()).await.unwrap_err();
    assert!(why.contains("cannot reach"), "{why}");
    let outsider = client(&AgentTlsFiles { ca: Some(pki.dir.join("ca.crt")), ..rogue.operator(Some(AGENT_NAME)) });
    assert!(ask(&outsider, good.local_addr()).await.is_err());
    let clear = AgentClient::new(Duration::from_millis(800));
    assert!(ask(&clear, good.local_addr()).await.is_err());

    // Without a server name the address dialled is checked: an IP SAN passes, a DNS name alone does not.
    let by_address = client(&pki.operator(None));
    let with_ip = agent("checkout", Some(pki.agent("with-ip", &[AGENT_NAME, "127.0.0.1"])), None).await;
    assert_eq!(ask(&by_address, with_ip.local_addr()).await, Ok(FIRST_ANSWER));
    let why = ask(&by_address, good.local_addr()).await.unwrap_err();
    assert!(why.contains("not valid for name"), "{why}");

    // The token stays on top of TLS.
    let guarded = agent("checkout", Some(pki.agent("guarded", &[AGENT_NAME])), Some("t0k3n")).await;
    let why = ask(&mutual, guarded.local_addr()).await.unwrap_err();
    assert!(why.contains("refused") && why.contains("token"), "{why}");
    let with_token = client(&pki.operator(Some(AGENT_NAME))).with_token("t0k3n").unwrap();
    assert_eq!(ask(&with_token, guarded.local_addr()).await, Ok(FIRST_ANSWER));

    for agent in [good, impostor, misnamed, plain, with_ip, guarded] {
        agent.shutdown(Duration::from_millis(200)).await;
    }
}

/// A loopback TCP relay to `target` that counts the connections made through it.
async fn counting_relay(target: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_per_agent_is_reused_from_call_to_call() {
    let pki = Pki::new("reuse");
    let good = agent("checkout", Some(pki.agent("good", &[AGENT_NAME])), None).await;
    let (relay, connections) = counting_relay(good.local_addr()).await;
    let mutual = client(&pki.operator(Some(AGENT_NAME)));
    for _ in 0..3 {
        assert_eq!(ask(&mutual, relay).await, Ok(FIRST_ANSWER));
    }
    // Clones share the channels, as reconciles share the operator's configuration.
    assert_eq!(ask(&mutual.clone(), relay).await, Ok(FIRST_ANSWER));
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    good.shutdown(Duration::from_millis(200)).await;
}

/// The operator (no leader election, 1 s resync) calling the agents with `agents`, against `api`.
fn start_operator(
    api: &ApiServer,
    agents: AgentClient,
) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<Result<(), rootscale_operator::Error>>) {
    let config = RunConfig {
        namespaces: vec!["shop".into()],
        http_addr: "127.0.0.1:0".parse().unwrap(),
        operator: OperatorConfig { resync: Duration::from_secs(1), agents, ..OperatorConfig::default() },
        leader_election: None,
        dashboard_addr: None,
        lease_duration: rootscale_operator::leadership::DEFAULT_LEASE_DURATION,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    (stop, tokio::spawn(run_until(api.client(), config, stopped)))
}

fn status(api: &ApiServer, name: &str) -> Value {
    api.get("scalingdecisions", "shop", name).map(|d| d["status"].clone()).unwrap_or(Value::Null)
}

/// The `ScalingActive` condition of `name`'s decision.
fn scaling_active(api: &ApiServer, name: &str) -> Value {
    status(api, name)["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "ScalingActive"))
        .cloned()
        .unwrap_or(Value::Null)
}

async fn stop(
    stop: tokio::sync::watch::Sender<bool>,
    operator: tokio::task::JoinHandle<Result<(), rootscale_operator::Error>>,
    services: Vec<Service>,
) {
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), operator).await;
    for service in services {
        service.agent.shutdown(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bottleneck_is_scaled_through_agents_on_mutual_tls() {
    // svc-a → svc-b, as in the stand-in tests, with every agent port on mutual TLS (the agents exchange their
    // reports over it too): svc-b serves 50 requests/s (one slot, 20 ms); 100 arrive.
    let pki = Pki::new("scale");
    let b =
        service_with(Agent::builder("svc-b").tls(pki.agent("svc-b", &[AGENT_NAME, "svc-b.shop.svc"])), 1, None).await;
    let a = service_with(
        Agent::builder("svc-a").tls(pki.agent("svc-a", &[AGENT_NAME, "svc-a.shop.svc"])),
        64,
        Some(b.addr),
    )
    .await;
    let api = ApiServer::start().await;
    api.create("deployments", deployment("svc-a", a.agent.local_addr().port(), &[("slo-latency", "100ms")]));
    api.create("deployments", deployment("svc-b", b.agent.local_addr().port(), &[]));
    api.create("pods", pod("svc-a"));
    api.create("pods", pod("svc-b"));
    let deadline = Instant::now() + Duration::from_secs(20);
    load(a.addr, 100.0, deadline);
    let (stopper, operator) = start_operator(&api, client(&pki.operator(Some(AGENT_NAME))));
    while Instant::now() < deadline && scale_patches(&api, "svc-b").is_empty() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (a_status, b_status) = (status(&api, "svc-a"), status(&api, "svc-b"));
    stop(stopper, operator, vec![a, b]).await;
    assert!(!scale_patches(&api, "svc-b").is_empty(), "svc-b was never scaled: {b_status:#}");
    assert!(scale_patches(&api, "svc-a").is_empty(), "svc-a's /scale must not be patched");
    let replicas = api.get("deployments", "shop", "svc-b").unwrap()["spec"]["replicas"].as_u64();
    assert!(replicas > Some(1), "{replicas:?}");
    assert_eq!(b_status["verdict"], "root-cause", "svc-b: {b_status:#}");
    assert_eq!(a_status["verdict"], "delegated", "svc-a: {a_status:#}");
    assert_eq!(scaling_active(&api, "svc-b")["status"], "True");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_whose_certificates_do_not_match_are_missing_data_and_never_scaled() {
    // Three lone services, each one slot for 100 requests/s against a 100 ms SLO: each agent, asked, would say
    // root-cause. One has a good certificate; one's is from another CA; one's is for another name.
    let pki = Pki::new("refuse");
    let rogue = Pki::new("refuse-rogue");
    let services = [
        ("svc-good", pki.agent("svc-good", &[AGENT_NAME])),
        ("svc-rogue", rogue.agent("svc-rogue", &[AGENT_NAME])),
        ("svc-misnamed", pki.agent("svc-misnamed", &["svc-misnamed.shop.svc"])),
    ];
    let api = ApiServer::start().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut running = Vec::new();
    for (name, files) in services {
        let service = service_with(Agent::builder(name).tls(files), 1, None).await;
        api.create("deployments", deployment(name, service.agent.local_addr().port(), &[("slo-latency", "100ms")]));
        api.create("pods", pod(name));
        load(service.addr, 100.0, deadline);
        running.push(service);
    }
    let (stopper, operator) = start_operator(&api, client(&pki.operator(Some(AGENT_NAME))));
    // The good one is scaled: the operator works; give the others as many reconciles.
    while Instant::now() < deadline && scale_patches(&api, "svc-good").is_empty() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop(stopper, operator, running).await;
    assert!(!scale_patches(&api, "svc-good").is_empty(), "svc-good: {:#}", status(&api, "svc-good"));
    for (name, error) in [("svc-rogue", "UnknownIssuer"), ("svc-misnamed", "not valid for name")] {
        assert!(scale_patches(&api, name).is_empty(), "{name} was scaled");
        assert_eq!(api.get("deployments", "shop", name).unwrap()["spec"]["replicas"].as_u64(), Some(1));
        let active = scaling_active(&api, name);
        assert_eq!(active["status"], "False", "{name}: {active:#}");
        assert_eq!(active["reason"], "FailedGetAgentRecommendation", "{name}: {active:#}");
        let message = active["message"].as_str().unwrap_or_default();
        assert!(message.contains("cannot reach") && message.contains(error), "{name}: {message}");
        assert_eq!(status(&api, name)["verdict"], "insufficient-data", "{name}");
        let events: Vec<Value> = api
            .list("events")
            .into_iter()
            .filter(|e| e["reason"] == "AgentUnreachable" && e["regarding"]["name"] == name)
            .collect();
        assert!(!events.is_empty(), "no AgentUnreachable Event for {name}");
    }
}
