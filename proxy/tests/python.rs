//! A Python service (`examples/python/service.py`, standard library only, knowing nothing of rootscale) behind
//! rootscale-proxy, in topologies with linked Rust services, all on loopback: the verdicts are those of the same
//! topology with every service linked (each test runs that first, and checks it says the same) — the faulty
//! service says root-cause, every service above it says delegated toward it — within 2 windows, with the Python
//! service as the root cause, as a middle service that delegates, and as the entry calling a slow Rust service;
//! with the trace context passed on (each call tied to its request, no estimate) and without it (the proxy
//! estimates the service's own wait for the window, and the Python service's decision says so; in a diamond the
//! caller then follows the proxied branch only, to the same root cause).
//!
//! Every service holds one of its workers for 10 ms per request; a fault is a pool of one worker (100 requests/s)
//! or two (200), below the load of 120 requests/s at the entry (240 at a diamond's bottom). 1 s windows.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use common::{ONE_AT_A_TIME, rust_service};
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rootscale_proto::v1::Verdict;
use rootscale_proxy::{Proxy, Routes};
use rootscale_tracer::{
    Agent, AgentBuilder,
    identity::{KeyRing, MeshKeys},
};

const WORK: Duration = Duration::from_millis(10);
const RATE: u64 = 120;
const SLO: Duration = Duration::from_millis(200);

/// The Python service, stopped when dropped.
struct Python(Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python(
    name: &str,
    pool: usize,
    callees: &[&str],
    propagate: bool,
    proxy: Option<SocketAddr>,
) -> (Python, SocketAddr) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/python/service.py");
    let mut command = Command::new("python3");
    command.arg(script).args(["--name", name, "--pool", &pool.to_string(), "--work", &WORK.as_millis().to_string()]);
    for callee in callees {
        command.args(["--call", callee]);
    }
    if !propagate {
        command.arg("--no-propagate");
    }
    match proxy {
        Some(proxy) => command.env("HTTP_PROXY", format!("http://{proxy}")),
        None => command.env_remove("HTTP_PROXY").env_remove("http_proxy"),
    };
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("python3 runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line.trim().strip_prefix("listening on ").and_then(|p| p.parse().ok()).expect("it says its port");
    (Python(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A topology: services by name, each Rust or Python, its pool and callees.
#[derive(Clone, Copy)]
struct Spec {
    name: &'static str,
    python: bool,
    pool: usize,
    callees: &'static [&'static str],
}

const fn rust(name: &'static str, pool: usize, callees: &'static [&'static str]) -> Spec {
    Spec { name, python: false, pool, callees }
}

const fn py(name: &'static str, pool: usize, callees: &'static [&'static str]) -> Spec {
    Spec { name, python: true, pool, callees }
}

/// Everything running, and the agents by service.
struct Running {
    agents: BTreeMap<&'static str, Agent>,
    entry: SocketAddr,
    _proxies: Vec<Proxy>,
    _pythons: Vec<Python>,
}

/// Starts `specs` (callees listed before their callers; the last is the entry).
async fn start(specs: &[Spec], propagate: bool) -> Running {
    let keys = Arc::new(KeyRing::fixed(MeshKeys::generate().unwrap()));
    let mut addrs: BTreeMap<&str, SocketAddr> = BTreeMap::new();
    let mut agents = BTreeMap::new();
    let (mut proxies, mut pythons) = (Vec::new(), Vec::new());
    let entry_name = specs.last().unwrap().name;
    for spec in specs {
        let agent = start_agent(spec.name, &keys, spec.name == entry_name).await;
        let callees: Vec<(String, SocketAddr)> = spec.callees.iter().map(|c| (c.to_string(), addrs[c])).collect();
        let addr = if spec.python {
            let routes = callees.iter().fold(Routes::default(), |routes, (name, addr)| {
                routes.with(name, addr.to_string().parse().unwrap()).unwrap()
            });
            // The application needs the proxy's outbound port to start, and the proxy the application's address:
            // a free port is found for the outbound first (on loopback, nothing else takes it in between).
            let (proxy, python) = {
                let mut config = rootscale_proxy::ProxyConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
                config.inbound = "127.0.0.1:0".parse().unwrap();
                config.outbound = "127.0.0.1:0".parse().unwrap();
                config.routes = routes;
                let outbound = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                config.outbound = outbound.local_addr().unwrap();
                drop(outbound);
                let (python, app) = python(spec.name, spec.pool, spec.callees, propagate, Some(config.outbound));
                config.app = app;
                (Proxy::start(&config, &agent).await.unwrap(), python)
            };
            let inbound = proxy.inbound_addr();
            proxies.push(proxy);
            pythons.push(python);
            inbound
        } else {
            rust_service(&agent, spec.pool, WORK, callees).await
        };
        addrs.insert(spec.name, addr);
        agents.insert(spec.name, agent);
    }
    Running { agents, entry: addrs[entry_name], _proxies: proxies, _pythons: pythons }
}

async fn start_agent(name: &str, keys: &Arc<KeyRing>, entry: bool) -> Agent {
    let mut builder: AgentBuilder = Agent::builder(name)
        .listen("127.0.0.1:0".parse().unwrap())
        .window(Duration::from_secs(1))
        .mesh_keys(keys.clone())
        .exchange_timeout(Duration::from_millis(500));
    if entry {
        builder = builder.slo(SLO, 95.0);
    }
    builder.start().await.unwrap()
}

fn window_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 / 1000
}

/// Sleeps until window `id` has closed and its delegations had time to travel.
async fn after_window(id: u64) {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(((id + 1) * 1000).saturating_sub(now_ms) + 400)).await;
}

/// Open-loop load at `RATE` until dropped.
fn load(entry: SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
        loop {
            ticks.tick().await;
            let client = client.clone();
            tokio::spawn(async move {
                if let Ok(response) = client.get(format!("http://{entry}/").parse().unwrap()).await {
                    let _ = response.into_body().collect().await;
                }
            });
        }
    })
}

/// What each service should say: its verdict, and for a delegation the callees it may delegate to.
type Expected = &'static [(&'static str, Verdict, &'static [&'static str])];

/// Whether the agents' latest decisions are `expected` (services not listed say neither root-cause nor
/// delegated), all about the same window.
fn check(running: &Running, expected: Expected) -> Result<(), String> {
    let mut windows = BTreeSet::new();
    for (name, agent) in &running.agents {
        let snapshot = agent.view().snapshot();
        windows.insert(snapshot.last_window.map_or(0, |w| w.window_id));
        let decision = snapshot.decision.unwrap_or_default();
        let reason = decision.evidence.as_ref().map(|e| e.reason.clone()).unwrap_or_default();
        match expected.iter().find(|(service, _, _)| service == name) {
            Some((_, verdict, toward)) => {
                if decision.verdict() != *verdict {
                    return Err(format!("{name} says {:?} ({reason}), not {verdict:?}", decision.verdict()));
                }
                let delegated: Vec<&str> = decision.delegated_to.iter().map(String::as_str).collect();
                if *verdict == Verdict::Delegated
                    && (delegated.is_empty() || !delegated.iter().all(|d| toward.contains(d)))
                {
                    return Err(format!("{name} delegated to {delegated:?}, not toward {toward:?} ({reason})"));
                }
            }
            None => {
                if matches!(decision.verdict(), Verdict::RootCause | Verdict::Delegated) {
                    return Err(format!("{name} says {:?} ({reason})", decision.verdict()));
                }
            }
        }
    }
    if windows.len() != 1 {
        return Err(format!("decisions about different windows: {windows:?}"));
    }
    Ok(())
}

/// Runs `specs` under load and checks the first two full windows for `expected`: first with every service linked
/// (the verdicts to match), then with the Python services behind the proxy, passing the trace context on or not.
async fn localized(specs: &[Spec], propagate: bool, expected: Expected) {
    localized_as(specs, propagate, expected, expected).await;
}

/// The same, where the proxied topology is expected to say `proxied` rather than what the linked one says.
async fn localized_as(specs: &[Spec], propagate: bool, linked: Expected, proxied: Expected) {
    let all_rust: Vec<Spec> = specs.iter().map(|spec| Spec { python: false, ..*spec }).collect();
    if let Err(why) = run_until_localized(&all_rust, true, linked).await {
        panic!("the all-Rust topology itself is not localised within 2 windows: {why}");
    }
    if let Err(why) = run_until_localized(specs, propagate, proxied).await {
        panic!("not localised within 2 windows (trace context passed on: {propagate}): {why}");
    }
}

async fn run_until_localized(specs: &[Spec], propagate: bool, expected: Expected) -> Result<(), String> {
    let running = start(specs, propagate).await;
    let loading = load(running.entry);
    let started = window_now();
    let mut outcome = Err(String::new());
    for k in 1..=2 {
        after_window(started + k).await;
        outcome = check(&running, expected).and_then(|()| check_estimates(&running, specs, propagate));
        if outcome.is_ok() {
            break;
        }
    }
    loading.abort();
    outcome
}

/// A Python service that passes the trace context on has every call tied to its request, so its decision is
/// measured; one that does not has its own wait estimated, and its decision says so. Linked services never
/// estimate.
fn check_estimates(running: &Running, specs: &[Spec], propagate: bool) -> Result<(), String> {
    for spec in specs {
        let decision = running.agents[spec.name].view().snapshot().decision.unwrap_or_default();
        let evidence = decision.evidence.unwrap_or_default();
        let estimated = spec.python && !propagate && !spec.callees.is_empty();
        match (&evidence.local_wait_estimate, estimated) {
            (Some(estimate), true) if estimate.untied_calls > 0 && evidence.reason.contains("estimated") => {}
            (None, false) => {}
            (estimate, _) => {
                return Err(format!(
                    "{}: local wait estimate {estimate:?}, expected {}; reason: {}",
                    spec.name,
                    if estimated { "one, said in the reason" } else { "none" },
                    evidence.reason
                ));
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_with_python_as_the_root_cause_with_and_without_the_trace_context() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let chain = [rust("svc-c", 64, &[]), py("svc-b", 1, &["svc-c"]), rust("svc-a", 64, &["svc-b"])];
    let expected: Expected = &[("svc-a", Verdict::Delegated, &["svc-b"]), ("svc-b", Verdict::RootCause, &[])];
    localized(&chain, true, expected).await;
    localized(&chain, false, expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_with_python_in_the_middle_delegating_to_a_slow_rust_service() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let chain = [rust("svc-c", 1, &[]), py("svc-b", 64, &["svc-c"]), rust("svc-a", 64, &["svc-b"])];
    let expected: Expected = &[
        ("svc-a", Verdict::Delegated, &["svc-b"]),
        ("svc-b", Verdict::Delegated, &["svc-c"]),
        ("svc-c", Verdict::RootCause, &[]),
    ];
    localized(&chain, true, expected).await;
    localized(&chain, false, expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_at_the_entry_calling_a_slow_rust_service() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let chain = [rust("svc-b", 1, &[]), py("svc-a", 64, &["svc-b"])];
    let expected: Expected = &[("svc-a", Verdict::Delegated, &["svc-b"]), ("svc-b", Verdict::RootCause, &[])];
    localized(&chain, true, expected).await;
    localized(&chain, false, expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diamond_with_python_as_the_root_cause_and_as_a_branch_over_a_slow_rust_service() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // A calls B then C; both call D. B is Python.
    let python_slow = [
        rust("svc-d", 64, &[]),
        py("svc-b", 1, &["svc-d"]),
        rust("svc-c", 64, &["svc-d"]),
        rust("svc-a", 64, &["svc-b", "svc-c"]),
    ];
    let expected: Expected = &[("svc-a", Verdict::Delegated, &["svc-b"]), ("svc-b", Verdict::RootCause, &[])];
    localized(&python_slow, true, expected).await;
    localized(&python_slow, false, expected).await;
    let bottom_slow = [
        rust("svc-d", 2, &[]),
        py("svc-b", 64, &["svc-d"]),
        rust("svc-c", 64, &["svc-d"]),
        rust("svc-a", 64, &["svc-b", "svc-c"]),
    ];
    let expected: Expected = &[
        ("svc-a", Verdict::Delegated, &["svc-b", "svc-c"]),
        ("svc-b", Verdict::Delegated, &["svc-d"]),
        ("svc-c", Verdict::Delegated, &["svc-d"]),
        ("svc-d", Verdict::RootCause, &[]),
    ];
    localized(&bottom_slow, true, expected).await;
    // Without the trace context the proxy cannot say which call of a request waited longest, so the response
    // points at svc-b itself: svc-a follows the branch through svc-b only (svc-c is not named), svc-b's estimate
    // delegates to svc-d, and svc-d is still the one root cause.
    let through_b: Expected = &[
        ("svc-a", Verdict::Delegated, &["svc-b"]),
        ("svc-b", Verdict::Delegated, &["svc-d"]),
        ("svc-d", Verdict::RootCause, &[]),
    ];
    localized_as(&bottom_slow, false, expected, through_b).await;
}
