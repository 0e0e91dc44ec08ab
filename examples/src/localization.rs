//! A harness for bottleneck localization: each service of a topology runs for real on loopback (axum for HTTP,
//! tonic for gRPC) on its own single-threaded runtime (its own "CPU"), instrumented with rootscale and with its
//! own agent; an open-loop load generator drives the entry service; faults are injected while it runs (a worker
//! pool too small for the load, a CPU-bound handler, a slowed link, a killed service); and every agent's verdict is
//! read after each window.

use crate::handler::{Handle, grpc_service, http_router};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rootscale_proto::v1::{Verdict as WireVerdict, WaitKind};
use rootscale_tracer::{
    Agent, AgentView, TraceClient,
    aggregate::histogram::Histogram,
    decide::AggregationMode,
    identity::{KeyRing, MeshKeys},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, oneshot},
};
use tower::ServiceBuilder;

use crate::demo::{CallRequest, demo_client::DemoClient};

/// How a service is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

/// One service of a topology.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub protocol: Protocol,
    /// Groups of calls made one group after another; the calls in a group run in parallel.
    pub calls: Vec<Vec<String>>,
    /// Time each request holds a worker-pool slot (sleeping: I/O-like work).
    pub work: Duration,
    /// Worker-pool slots.
    pub pool: usize,
}

impl ServiceSpec {
    pub fn new(name: &str, protocol: Protocol) -> Self {
        Self { name: name.into(), protocol, calls: Vec::new(), work: Duration::from_millis(10), pool: 64 }
    }

    /// Calls `callees` one after another.
    pub fn calls(mut self, callees: &[&str]) -> Self {
        self.calls.extend(callees.iter().map(|callee| vec![callee.to_string()]));
        self
    }

    /// Calls `callees` all at once.
    pub fn parallel(mut self, callees: &[&str]) -> Self {
        self.calls.push(callees.iter().map(|callee| callee.to_string()).collect());
        self
    }

    pub fn pool(mut self, slots: usize, work: Duration) -> Self {
        self.pool = slots;
        self.work = work;
        self
    }
}

/// A call graph with one entry service (called over HTTP by the load generator).
#[derive(Clone, Debug)]
pub struct Topology {
    pub name: String,
    pub services: Vec<ServiceSpec>,
}

impl Topology {
    /// A → B → C → D, protocols alternating.
    pub fn chain4() -> Self {
        use Protocol::*;
        Self {
            name: "chain-4".into(),
            services: vec![
                ServiceSpec::new("svc-a", Http).calls(&["svc-b"]),
                ServiceSpec::new("svc-b", Grpc).calls(&["svc-c"]),
                ServiceSpec::new("svc-c", Http).calls(&["svc-d"]),
                ServiceSpec::new("svc-d", Grpc),
            ],
        }
    }

    /// A → B, A → C (one after the other), B → D, C → D.
    pub fn diamond() -> Self {
        use Protocol::*;
        Self {
            name: "diamond".into(),
            services: vec![
                ServiceSpec::new("svc-a", Http).calls(&["svc-b", "svc-c"]),
                ServiceSpec::new("svc-b", Grpc).calls(&["svc-d"]),
                ServiceSpec::new("svc-c", Http).calls(&["svc-d"]),
                ServiceSpec::new("svc-d", Http),
            ],
        }
    }

    /// A → (B, C, D) in parallel.
    pub fn fanout() -> Self {
        use Protocol::*;
        Self {
            name: "fan-out".into(),
            services: vec![
                ServiceSpec::new("svc-a", Http).parallel(&["svc-b", "svc-c", "svc-d"]),
                ServiceSpec::new("svc-b", Grpc),
                ServiceSpec::new("svc-c", Http),
                ServiceSpec::new("svc-d", Grpc),
            ],
        }
    }

    pub fn entry(&self) -> &str {
        &self.services[0].name
    }

    fn spec(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name == name)
    }

    pub fn callees(&self, name: &str) -> BTreeSet<String> {
        self.spec(name).map(|s| s.calls.iter().flatten().cloned().collect()).unwrap_or_default()
    }

    /// Every service from which `target` can be reached.
    pub fn ancestors(&self, target: &str) -> BTreeSet<String> {
        crate::local::topology::ancestors(
            self.services.iter().map(|s| s.name.as_str()),
            |name| self.callees(name),
            target,
        )
    }

    /// Services in an order where every callee comes before its callers.
    fn start_order(&self) -> Vec<String> {
        let mut order: Vec<String> = Vec::new();
        while order.len() < self.services.len() {
            for service in &self.services {
                if !order.contains(&service.name) && self.callees(&service.name).iter().all(|c| order.contains(c)) {
                    order.push(service.name.clone());
                }
            }
        }
        order
    }
}

/// A fault to inject.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Shrink the service's worker pool to this many slots.
    Pool(usize),
    /// Burn this much CPU per request on the service's single thread.
    Cpu(Duration),
    /// Delay every response on the link from `from` to `to`.
    Link { from: String, to: String, delay: Duration },
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Pool(_) => "pool",
            Fault::Cpu(_) => "cpu",
            Fault::Link { .. } => "link",
        }
    }
}

/// How a run is set up.
#[derive(Clone, Debug)]
pub struct Settings {
    pub window: Duration,
    /// The entry service's SLO at p95.
    pub slo: Duration,
    /// Requests per second from the load generator.
    pub rate: f64,
    pub mode: AggregationMode,
    /// Links that go through a delaying proxy (needed for `Fault::Link`).
    pub proxied: Vec<(String, String)>,
    /// The mesh key every service proves its membership with (`None`: an open mesh).
    pub mesh_keys: Option<Arc<KeyRing>>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(1),
            slo: Duration::from_millis(200),
            rate: 150.0,
            mode: AggregationMode::Max,
            proxied: Vec::new(),
            // Identity on, as in production; a key made for the run.
            mesh_keys: MeshKeys::generate().ok().map(|keys| Arc::new(KeyRing::fixed(keys))),
        }
    }
}

/// What a service's handler reads on every request, so faults apply at once.
struct Control {
    pool: Mutex<Arc<Semaphore>>,
    cpu_us: AtomicU64,
}

enum Callee {
    Http { client: TraceClient<Client<HttpConnector, Empty<Bytes>>>, uri: String },
    Grpc(DemoClient<TraceClient<tonic::transport::Channel>>),
}

impl Callee {
    async fn call(&self) -> Result<(), String> {
        match self {
            Callee::Http { client, uri } => crate::calls::http_get(client.clone(), uri).await,
            Callee::Grpc(client) => {
                client.clone().call(CallRequest {}).await.map(|_| ()).map_err(|status| status.message().to_string())
            }
        }
    }
}

struct Handler {
    name: String,
    control: Arc<Control>,
    work: Duration,
    calls: Vec<Vec<Callee>>,
}

/// Burns CPU for `duration` without yielding.
pub fn spin(duration: Duration) {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed() < duration {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

impl Handle for Handler {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&self) -> Result<(), String> {
        let pool = self.control.pool.lock().map_err(|_| "pool lock poisoned")?.clone();
        {
            let _slot = pool.acquire().await.map_err(|_| "pool closed")?;
            tokio::time::sleep(self.work).await;
        }
        let cpu = self.control.cpu_us.load(Ordering::Relaxed);
        if cpu > 0 {
            spin(Duration::from_micros(cpu));
        }
        for group in &self.calls {
            for outcome in join_all(group.iter().map(Callee::call)).await {
                outcome?;
            }
        }
        Ok(())
    }
}

struct RunningService {
    addr: SocketAddr,
    agent_addr: SocketAddr,
    view: AgentView,
    control: Arc<Control>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A link through a proxy whose response delay can change while it runs.
struct Proxy {
    delay_us: Arc<AtomicU64>,
}

/// The load generator's tally.
#[derive(Default)]
pub struct LoadStats {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub latency: Histogram,
}

/// One service's view after a window: which window, and its decision.
#[derive(Clone, Debug)]
pub struct Seen {
    pub window_id: u64,
    pub verdict: WireVerdict,
    pub delegated_to: Vec<String>,
    /// For a network verdict: the link, as (from, to).
    pub link: Option<(String, String)>,
    pub reason: String,
}

/// A topology running under load.
pub struct Running {
    pub topology: Topology,
    pub settings: Settings,
    services: BTreeMap<String, RunningService>,
    proxies: BTreeMap<(String, String), Proxy>,
    harness: tokio::runtime::Runtime,
    load: Arc<Mutex<LoadStats>>,
    load_stop: Arc<AtomicBool>,
}

fn start_service(
    spec: ServiceSpec,
    settings: &Settings,
    entry: bool,
    targets: BTreeMap<String, (Protocol, SocketAddr)>,
) -> Result<RunningService, String> {
    let (ready, ready_receiver) = std::sync::mpsc::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let control =
        Arc::new(Control { pool: Mutex::new(Arc::new(Semaphore::new(spec.pool))), cpu_us: AtomicU64::new(0) });
    let settings = settings.clone();
    let thread_control = control.clone();
    let thread = std::thread::Builder::new()
        .name(spec.name.clone())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = ready.send(Err(error.to_string()));
                    return;
                }
            };
            runtime.block_on(async move {
                let mut agent = Agent::builder(&spec.name)
                    .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
                    .window(settings.window)
                    .mode(settings.mode)
                    .concurrency(spec.pool as u32)
                    // Each service runs on one thread: one core, whatever the machine or container has.
                    .cpu_cores(1.0)
                    .exchange_timeout(Duration::from_millis(500));
                if let Some(keys) = &settings.mesh_keys {
                    agent = agent.mesh_keys(keys.clone());
                }
                if entry {
                    agent = agent.slo(settings.slo, 95.0);
                }
                let agent = match agent.start().await {
                    Ok(agent) => agent,
                    Err(error) => {
                        let _ = ready.send(Err(error.to_string()));
                        return;
                    }
                };
                let calls = spec
                    .calls
                    .iter()
                    .map(|group| {
                        group
                            .iter()
                            .filter_map(|callee| {
                                let (protocol, addr) = targets.get(callee)?;
                                Some(match protocol {
                                    Protocol::Http => {
                                        let client = Client::builder(TokioExecutor::new()).build_http();
                                        Callee::Http {
                                            client: ServiceBuilder::new().layer(agent.client_layer()).service(client),
                                            uri: format!("http://{addr}/"),
                                        }
                                    }
                                    Protocol::Grpc => {
                                        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                                            .ok()?
                                            .connect_lazy();
                                        let layer = agent.client_layer().callee(callee).ok()?;
                                        Callee::Grpc(DemoClient::new(
                                            ServiceBuilder::new().layer(layer).service(channel),
                                        ))
                                    }
                                })
                            })
                            .collect()
                    })
                    .collect();
                let handler =
                    Arc::new(Handler { name: spec.name.clone(), control: thread_control, work: spec.work, calls });
                let listener = match TcpListener::bind("127.0.0.1:0").await {
                    Ok(listener) => listener,
                    Err(error) => {
                        let _ = ready.send(Err(error.to_string()));
                        return;
                    }
                };
                let addr = listener.local_addr().map_err(|e| e.to_string());
                let server = match spec.protocol {
                    Protocol::Http => {
                        let app = http_router(handler.clone()).layer(agent.server_layer());
                        tokio::spawn(async move {
                            let _ = axum::serve(listener, app).await;
                        })
                    }
                    Protocol::Grpc => {
                        let router = tonic::transport::Server::builder()
                            .layer(agent.server_layer())
                            .add_service(grpc_service(handler.clone()));
                        // Without TCP_NODELAY a response can sit out a delayed ACK, which callers measure as
                        // network time.
                        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                        tokio::spawn(async move {
                            let _ = router.serve_with_incoming(incoming).await;
                        })
                    }
                };
                let _ = ready.send(addr.map(|addr| (addr, agent.local_addr(), agent.view())));
                let _ = stopped.await;
                server.abort();
                agent.shutdown(Duration::from_millis(200)).await;
            });
        })
        .map_err(|error| error.to_string())?;
    let (addr, agent_addr, view) = ready_receiver.recv().map_err(|_| "service thread ended".to_string())??;
    Ok(RunningService { addr, agent_addr, view, control, stop: Some(stop), thread: Some(thread) })
}

async fn proxy_connection(client: TcpStream, upstream: SocketAddr, delay_us: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((due, chunk)) = receiver.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if client_write.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(n) = server_read.read(&mut buffer).await {
        if n == 0 {
            return;
        }
        let due = Instant::now() + Duration::from_micros(delay_us.load(Ordering::Relaxed));
        if sender.send((due, buffer[..n].to_vec())).is_err() {
            return;
        }
    }
}

impl Running {
    /// Starts every service (callees first) and the load generator.
    pub fn start(topology: Topology, settings: Settings) -> Result<Self, String> {
        let harness = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|error| error.to_string())?;
        let mut services: BTreeMap<String, RunningService> = BTreeMap::new();
        let mut proxies = BTreeMap::new();
        for name in topology.start_order() {
            let spec = topology.spec(&name).cloned().ok_or("unknown service")?;
            let mut targets = BTreeMap::new();
            for callee in topology.callees(&name) {
                let callee_spec = topology.spec(&callee).ok_or("unknown callee")?;
                let mut addr = services[&callee].addr;
                if settings.proxied.contains(&(name.clone(), callee.clone())) {
                    let delay_us = Arc::new(AtomicU64::new(0));
                    let listener = harness.block_on(TcpListener::bind("127.0.0.1:0")).map_err(|e| e.to_string())?;
                    let proxy_addr = listener.local_addr().map_err(|e| e.to_string())?;
                    let (upstream, delay) = (addr, delay_us.clone());
                    harness.spawn(async move {
                        while let Ok((client, _)) = listener.accept().await {
                            tokio::spawn(proxy_connection(client, upstream, delay.clone()));
                        }
                    });
                    proxies.insert((name.clone(), callee.clone()), Proxy { delay_us });
                    addr = proxy_addr;
                }
                targets.insert(callee.clone(), (callee_spec.protocol, addr));
            }
            let entry = name == topology.entry();
            services.insert(name.clone(), start_service(spec, &settings, entry, targets)?);
        }
        let running =
            Self { topology, settings, services, proxies, harness, load: Arc::default(), load_stop: Arc::default() };
        running.start_load();
        Ok(running)
    }

    /// Open-loop load at the settings' rate: requests are sent on schedule whether or not earlier ones returned.
    fn start_load(&self) {
        let entry = self.services[self.topology.entry()].addr;
        let (stats, stop) = (self.load.clone(), self.load_stop.clone());
        let interval = Duration::from_secs_f64(1.0 / self.settings.rate.max(0.1));
        self.harness.spawn(async move {
            let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let mut ticks = tokio::time::interval(interval);
            while !stop.load(Ordering::Relaxed) {
                ticks.tick().await;
                let (client, stats) = (client.clone(), stats.clone());
                tokio::spawn(async move {
                    let started = Instant::now();
                    let uri = format!("http://{entry}/");
                    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                        let response = client.get(uri.parse().map_err(|_| ())?).await.map_err(|_| ())?;
                        let ok = response.status().is_success();
                        response.into_body().collect().await.map_err(|_| ())?;
                        if ok { Ok(()) } else { Err(()) }
                    })
                    .await;
                    let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
                    stats.sent += 1;
                    match outcome {
                        Ok(Ok(())) => {
                            stats.ok += 1;
                            stats.latency.record(started.elapsed().as_micros() as u64);
                        }
                        _ => stats.failed += 1,
                    }
                });
            }
        });
    }

    pub fn inject(&self, service: &str, fault: &Fault) -> Result<(), String> {
        match fault {
            Fault::Pool(slots) => {
                let control = &self.services.get(service).ok_or("unknown service")?.control;
                *control.pool.lock().map_err(|_| "poisoned")? = Arc::new(Semaphore::new(*slots));
            }
            Fault::Cpu(per_request) => {
                let control = &self.services.get(service).ok_or("unknown service")?.control;
                control.cpu_us.store(per_request.as_micros() as u64, Ordering::Relaxed);
            }
            Fault::Link { from, to, delay } => {
                let proxy = self.proxies.get(&(from.clone(), to.clone())).ok_or("that link has no proxy")?;
                proxy.delay_us.store(delay.as_micros() as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Stops a service (server and agent) while the rest runs on.
    pub fn kill(&mut self, service: &str) {
        if let Some(running) = self.services.get_mut(service) {
            if let Some(stop) = running.stop.take() {
                let _ = stop.send(());
            }
            if let Some(thread) = running.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// The current window id (windows are aligned to wall-clock multiples, the same for every agent).
    pub fn window_now(&self) -> u64 {
        unix_ms() / self.settings.window.as_millis().max(1) as u64
    }

    /// Sleeps until window `id` has closed everywhere and delegations had time to travel.
    pub fn wait_for_window(&self, id: u64) {
        let window_ms = self.settings.window.as_millis().max(1) as u64;
        let end_ms = (id + 1) * window_ms;
        let now_ms = unix_ms();
        let settle_ms = (window_ms * 2 / 5).clamp(150, 600);
        std::thread::sleep(Duration::from_millis(end_ms.saturating_sub(now_ms) + settle_ms));
    }

    /// What every live service decided for its latest window.
    pub fn verdicts(&self) -> BTreeMap<String, Seen> {
        self.services
            .iter()
            .filter(|(_, s)| s.stop.is_some())
            .map(|(name, service)| {
                let snapshot = service.view.snapshot();
                let decision = snapshot.decision.unwrap_or_default();
                let link = decision
                    .bottleneck
                    .as_ref()
                    .filter(|point| point.kind() == WaitKind::Net)
                    .map(|point| (point.from_service.clone(), point.service.clone()));
                let seen = Seen {
                    window_id: snapshot.last_window.map_or(0, |w| w.window_id),
                    verdict: decision.verdict(),
                    delegated_to: decision.delegated_to.clone(),
                    link,
                    reason: decision.evidence.map(|e| e.reason).unwrap_or_default(),
                };
                (name.clone(), seen)
            })
            .collect()
    }

    /// Where a service's agent listens.
    pub fn agent_addr(&self, service: &str) -> Option<String> {
        self.services.get(service).map(|s| s.agent_addr.to_string())
    }

    /// The agents' views, by service.
    pub fn views(&self) -> BTreeMap<String, AgentView> {
        self.services.iter().map(|(name, s)| (name.clone(), s.view.clone())).collect()
    }

    /// A copy of the load generator's tally.
    pub fn load(&self) -> (u64, u64, u64, Histogram) {
        let stats = self.load.lock().unwrap_or_else(|p| p.into_inner());
        (stats.sent, stats.ok, stats.failed, stats.latency.clone())
    }

    /// Clears the load generator's tally.
    pub fn reset_load(&self) {
        *self.load.lock().unwrap_or_else(|p| p.into_inner()) = LoadStats::default();
    }

    /// Stops everything.
    pub fn stop(mut self) {
        self.load_stop.store(true, Ordering::Relaxed);
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            self.kill(&name);
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Whether a window's verdicts localise a fault at `at`: the right service says root-cause (or, for a link, the
/// caller says network), every service above it delegated toward it, and nobody else says root-cause.
pub fn localized(
    topology: &Topology,
    verdicts: &BTreeMap<String, Seen>,
    at: &str,
    fault: &Fault,
) -> Result<(), String> {
    let (culprit, ancestors) = match fault {
        Fault::Link { from, to, .. } => {
            let seen = verdicts.get(from).ok_or("caller missing")?;
            if seen.verdict != WireVerdict::Network || seen.link.as_ref() != Some(&(from.clone(), to.clone())) {
                return Err(format!("{from} says {:?} ({}), not network on {from}>{to}", seen.verdict, seen.reason));
            }
            (from.clone(), topology.ancestors(from))
        }
        _ => {
            let seen = verdicts.get(at).ok_or("service missing")?;
            if seen.verdict != WireVerdict::RootCause {
                return Err(format!("{at} says {:?} ({})", seen.verdict, seen.reason));
            }
            (at.to_string(), topology.ancestors(at))
        }
    };
    // Every verdict must be about the same window.
    let windows: BTreeSet<u64> = verdicts.values().map(|seen| seen.window_id).collect();
    if windows.len() != 1 {
        return Err(format!("verdicts from different windows: {windows:?}"));
    }
    for ancestor in &ancestors {
        let seen = verdicts.get(ancestor).ok_or("ancestor missing")?;
        let toward: BTreeSet<String> =
            topology.callees(ancestor).into_iter().filter(|c| *c == culprit || ancestors.contains(c)).collect();
        // Delegated toward the culprit, and only toward it.
        let only_toward = !seen.delegated_to.is_empty() && seen.delegated_to.iter().all(|d| toward.contains(d));
        if seen.verdict != WireVerdict::Delegated || !only_toward {
            return Err(format!(
                "{ancestor} says {:?} to {:?} ({}), not delegated toward {culprit}",
                seen.verdict, seen.delegated_to, seen.reason
            ));
        }
    }
    for (service, seen) in verdicts {
        if seen.verdict == WireVerdict::RootCause && *service != culprit {
            return Err(format!("{service} also says root-cause ({})", seen.reason));
        }
        if seen.verdict == WireVerdict::RootCause && matches!(fault, Fault::Link { .. }) {
            return Err(format!("{service} says root-cause for a slow link ({})", seen.reason));
        }
    }
    Ok(())
}

/// The outcome of one scenario.
#[derive(Debug)]
pub struct ScenarioResult {
    /// Windows after the one the fault began in until the verdicts localised it (1 = the first full window).
    pub detected_in: Option<u32>,
    /// Services that said root-cause in the window checked last (or the detecting one).
    pub root_causes: Vec<String>,
    /// Why the last window checked did not localise the fault.
    pub failure: Option<String>,
    /// Report bytes sent per report, across all agents.
    pub bytes_per_report: f64,
    /// Every service's view in the last window checked.
    pub last_verdicts: BTreeMap<String, Seen>,
}

/// Runs one scenario: warm up for a window, inject `fault` at `at`, and check up to `max_windows` windows.
pub fn run_scenario(
    topology: &Topology,
    settings: &Settings,
    at: &str,
    fault: &Fault,
    max_windows: u32,
) -> Result<ScenarioResult, String> {
    let mut settings = settings.clone();
    if let Fault::Link { from, to, .. } = fault {
        settings.proxied.push((from.clone(), to.clone()));
    }
    let running = Running::start(topology.clone(), settings)?;
    let warm_up = running.window_now();
    running.wait_for_window(warm_up);
    running.inject(at, fault)?;
    let injected = running.window_now();
    let mut result = ScenarioResult {
        detected_in: None,
        root_causes: Vec::new(),
        failure: None,
        bytes_per_report: 0.0,
        last_verdicts: BTreeMap::new(),
    };
    for k in 1..=max_windows {
        running.wait_for_window(injected + u64::from(k));
        let verdicts = running.verdicts();
        result.root_causes = verdicts
            .iter()
            .filter(|(_, seen)| seen.verdict == WireVerdict::RootCause)
            .map(|(name, _)| name.clone())
            .collect();
        let outcome = localized(topology, &verdicts, at, fault);
        result.last_verdicts = verdicts;
        match outcome {
            Ok(()) => {
                result.detected_in = Some(k);
                result.failure = None;
                break;
            }
            Err(why) => result.failure = Some(why),
        }
    }
    let (reports, bytes) =
        running.views().values().map(|v| v.reports_sent()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    result.bytes_per_report = if reports == 0 { 0.0 } else { bytes as f64 / reports as f64 };
    running.stop();
    Ok(result)
}
