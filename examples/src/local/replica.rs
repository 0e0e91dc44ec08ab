//! One replica of a service: a real server (axum for HTTP, tonic for gRPC) on its own loopback port, on its own
//! thread and single-threaded runtime, instrumented by its own rootscale agent.
//!
//! What a replica can do is modelled, so that replicas add capacity even on a 2-core machine: a request holds a
//! worker-pool slot for its service time (sleeping, like I/O) and one of the replica's virtual cores for its CPU
//! time (sleeping too, reported to the tracer as CPU work done off the request's task), and tells the tracer how
//! long it queued for the slot. Its calls come after, through a p2c balancer per callee — with the slot released
//! (`pool: own`, an async service) or still held (`pool: request`, a thread-per-request one). A replica stops by draining: its callers drop it first
//! (the cluster removes it from the registry), then it waits for its in-flight requests, then it shuts down.

use crate::handler::{Handle, grpc_service, http_router};
use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Exp, LogNormal};
use rootscale_tracer::{
    Agent, AgentView, RequestHandle, SampleRate, TraceClient,
    decide::{AggregationMode, PoolScope},
    identity::KeyRing,
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, oneshot, watch},
};
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::{
    demo::{CallRequest, demo_client::DemoClient},
    local::{
        Error,
        balance::{self, Balanced, Replicas},
        external,
        topology::{Protocol, Runtime, ServiceSpec, ServiceTime},
    },
};

/// Faults of one service, read by each of its replicas on every request, so they apply at once to all.
#[derive(Debug)]
pub struct ServiceControl {
    /// Pool slots per replica are divided by this (thousandths; 1000 = healthy).
    capacity_divisor_milli: AtomicU64,
    /// CPU time per request is multiplied by this (thousandths).
    cpu_factor_milli: AtomicU64,
    /// Added on the way into every request, outside the replica's own clock: a slow link into the service.
    link_delay_us: AtomicU64,
}

impl Default for ServiceControl {
    fn default() -> Self {
        Self {
            capacity_divisor_milli: AtomicU64::new(1000),
            cpu_factor_milli: AtomicU64::new(1000),
            link_delay_us: AtomicU64::new(0),
        }
    }
}

impl ServiceControl {
    pub fn divide_capacity(&self, factor: f64) {
        self.capacity_divisor_milli.store((factor * 1000.0) as u64, Ordering::Relaxed);
    }

    pub fn multiply_cpu(&self, factor: f64) {
        self.cpu_factor_milli.store((factor * 1000.0) as u64, Ordering::Relaxed);
    }

    pub fn delay_link(&self, delay: Duration) {
        self.link_delay_us.store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    fn slots(&self, capacity: u32) -> u32 {
        let divisor = self.capacity_divisor_milli.load(Ordering::Relaxed).max(1000) as f64 / 1000.0;
        ((f64::from(capacity) / divisor).floor() as u32).max(1)
    }

    fn cpu(&self, base: Duration) -> Duration {
        base.mul_f64(self.cpu_factor_milli.load(Ordering::Relaxed) as f64 / 1000.0)
    }
}

/// What a replica has used, read by the demo (the CPU-utilisation baseline, drains).
#[derive(Debug, Default)]
pub struct Usage {
    /// Requests inside the server now, from arrival (before any link delay) to response.
    pub in_flight: AtomicU64,
    /// Nanoseconds of CPU time the virtual cores ran.
    pub cpu_busy_ns: AtomicU64,
}

/// How a replica spends a request's CPU time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuModel {
    /// Holding one of the replica's virtual cores, asleep: replicas add capacity whatever the machine has.
    #[default]
    Virtual,
    /// Burning it on the replica's own thread (its one real core) while holding a virtual core: for overhead
    /// experiments; replicas then share the machine's real cores.
    Burn,
}

/// A replica's virtual cores, each a timeline: a request reserves its CPU time on the core that frees first, from
/// when that core frees (or now) for exactly that time, and waits until it is done.
///
/// A core is busy for the CPU time and no longer, however late the replica's thread wakes up: a starved process on
/// a loaded machine delays its requests (their own latency shows it) but not its modelled cores. Holding a core until
/// a late timer fired charged the lateness as CPU, and a debug build on two busy cores then looked saturated where
/// it was not. A reservation outlives a request dropped while it waits, as CPU work already handed over would.
struct VirtualCores {
    free_at: Mutex<Vec<Instant>>,
}

impl VirtualCores {
    fn new(cores: u32, now: Instant) -> Self {
        Self { free_at: Mutex::new(vec![now; cores.max(1) as usize]) }
    }

    /// Reserves `cpu` on the core that frees first; returns when the work starts.
    fn reserve(&self, now: Instant, cpu: Duration) -> Instant {
        let mut free_at = self.free_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let core = free_at.iter_mut().min().expect("at least one core");
        let start = (*core).max(now);
        *core = start + cpu;
        start
    }
}

/// Burns CPU for `duration` without yielding.
fn spin(duration: Duration) {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed() < duration {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

/// Everything a replica needs to start.
#[derive(Clone)]
pub struct ReplicaConfig {
    pub spec: ServiceSpec,
    pub control: Arc<ServiceControl>,
    /// The entry's SLO (latency, percentile), for the entry service's agent.
    pub slo: Option<(Duration, f64)>,
    pub window: Duration,
    pub mode: AggregationMode,
    /// Each callee's registry of replicas.
    pub callees: BTreeMap<String, (Protocol, watch::Receiver<Replicas>)>,
    pub seed: u64,
    pub cpu_model: CpuModel,
    /// The run's mesh key: every replica proves its membership with it.
    pub mesh_keys: Arc<KeyRing>,
    /// Which requests the replica measures.
    pub sample: SampleRate,
}

/// A running replica.
pub struct Replica {
    pub id: u32,
    pub addr: SocketAddr,
    pub agent_addr: SocketAddr,
    pub view: AgentView,
    pub usage: Arc<Usage>,
    stop: Option<oneshot::Sender<Duration>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Callee {
    Http(TraceClient<Balanced<http::Request<Empty<Bytes>>, http::Response<Incoming>>>),
    Grpc(DemoClient<TraceClient<Balanced<http::Request<tonic::body::Body>, http::Response<tonic::body::Body>>>>),
}

impl Callee {
    async fn call(&self) -> Result<(), String> {
        match self {
            Callee::Http(client) => crate::calls::http_get(client.clone(), "/").await,
            Callee::Grpc(client) => {
                client.clone().call(CallRequest {}).await.map(|_| ()).map_err(|status| status.message().to_string())
            }
        }
    }
}

/// The handler's state: the model of one replica.
struct Work {
    spec: ServiceSpec,
    control: Arc<ServiceControl>,
    usage: Arc<Usage>,
    /// The pool and its size; replaced when a capacity fault changes the size (requests holding the old one finish
    /// on it).
    pool: Mutex<(u32, Arc<Semaphore>)>,
    cores: VirtualCores,
    cpu_model: CpuModel,
    random: Mutex<StdRng>,
    callees: BTreeMap<String, Callee>,
}

impl Handle for Work {
    fn name(&self) -> &str {
        &self.spec.name
    }

    async fn handle(&self) -> Result<(), String> {
        self.serve().await
    }
}

impl Work {
    fn pool(&self) -> Arc<Semaphore> {
        let slots = self.control.slots(self.spec.capacity);
        let mut pool = self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if pool.0 != slots {
            *pool = (slots, Arc::new(Semaphore::new(slots as usize)));
        }
        pool.1.clone()
    }

    /// This request's service time and which of its steps it takes.
    fn draw(&self) -> (Duration, Vec<bool>) {
        let mut random = self.random.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let service_time = match self.spec.service_time {
            ServiceTime::Constant(value) => value,
            ServiceTime::Exponential { mean } => Exp::new(1.0 / mean.as_secs_f64().max(1e-9))
                .map(|exp| Duration::from_secs_f64(exp.sample(&mut *random).min(60.0)))
                .unwrap_or(mean),
            ServiceTime::LogNormal { median, sigma } => LogNormal::new(median.as_secs_f64().max(1e-9).ln(), sigma)
                .map(|dist| Duration::from_secs_f64(dist.sample(&mut *random).min(60.0)))
                .unwrap_or(median),
        };
        let steps = self.spec.steps.iter().map(|step| random.random::<f64>() < step.probability).collect();
        (service_time, steps)
    }

    async fn serve(&self) -> Result<(), String> {
        let (service_time, steps) = self.draw();
        let pool = self.pool();
        let request = RequestHandle::current();
        let queued_since = Instant::now();
        let slot = pool.acquire().await.map_err(|_| "pool closed")?;
        request.record_pool_wait(queued_since.elapsed());
        {
            if !service_time.is_zero() {
                tokio::time::sleep(service_time).await;
            }
            let cpu = self.control.cpu(self.spec.cpu);
            if !cpu.is_zero() {
                let queued_since = Instant::now();
                let start = self.cores.reserve(queued_since, cpu);
                match self.cpu_model {
                    CpuModel::Virtual => tokio::time::sleep_until((start + cpu).into()).await,
                    CpuModel::Burn => {
                        tokio::time::sleep_until(start.into()).await;
                        spin(cpu);
                    }
                }
                self.usage.cpu_busy_ns.fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
                request.record_offloaded_cpu(cpu, start - queued_since);
            }
        }
        // A thread-per-request service keeps its worker through the calls; an async one gives it back first.
        let _held = match self.spec.pool {
            PoolScope::Request => Some(slot),
            PoolScope::Own => {
                drop(slot);
                None
            }
        };
        for (step, taken) in self.spec.steps.iter().zip(steps) {
            if !taken {
                continue;
            }
            let calls = step.callees.iter().filter_map(|name| self.callees.get(name)).map(Callee::call);
            for outcome in join_all(calls).await {
                outcome?;
            }
        }
        Ok(())
    }
}

/// The outermost layer of a replica's server: counts requests in flight (for draining) and applies a link
/// fault's delay before the request reaches the instrumented server, so the callee's own clock does not see it
/// and its callers measure it as network time.
#[derive(Clone)]
struct IngressLayer {
    control: Arc<ServiceControl>,
    usage: Arc<Usage>,
}

impl<S> Layer<S> for IngressLayer {
    type Service = Ingress<S>;

    fn layer(&self, inner: S) -> Ingress<S> {
        Ingress { inner, control: self.control.clone(), usage: self.usage.clone() }
    }
}

#[derive(Clone)]
struct Ingress<S> {
    inner: S,
    control: Arc<ServiceControl>,
    usage: Arc<Usage>,
}

/// Counts a request out when its response (or its cancellation) is done.
struct InFlight(Arc<Usage>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, R> Service<R> for Ingress<S>
where
    S: Service<R> + Clone + Send + 'static,
    S::Future: Send,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Readiness is checked on the clone that serves the request (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.usage.in_flight.fetch_add(1, Ordering::AcqRel);
        let in_flight = InFlight(self.usage.clone());
        let delay = Duration::from_micros(self.control.link_delay_us.load(Ordering::Relaxed));
        let inner = self.inner.clone();
        Box::pin(async move {
            let _in_flight = in_flight;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            inner.oneshot(request).await
        })
    }
}

fn callee_clients(config: &ReplicaConfig, agent: &Agent) -> Result<BTreeMap<String, Callee>, Error> {
    let mut callees = BTreeMap::new();
    for (name, (protocol, registry)) in &config.callees {
        let layer = agent.client_layer().callee(name).map_err(|e| Error::Start(e.to_string()))?;
        let callee = match protocol {
            Protocol::Http => Callee::Http(layer.layer(balance::http_client(registry.clone()))),
            Protocol::Grpc => Callee::Grpc(DemoClient::new(layer.layer(balance::grpc_client(registry.clone())))),
        };
        callees.insert(name.clone(), callee);
    }
    Ok(callees)
}

/// Where a replica says it is ready: its address, its agent's, and the agent's view; or why it could not start.
pub(crate) type Ready = std::sync::mpsc::Sender<Result<(SocketAddr, SocketAddr, AgentView), Error>>;

/// The replica's agent, as its service's settings say.
pub(crate) fn agent_builder(config: &ReplicaConfig) -> rootscale_tracer::AgentBuilder {
    let spec = &config.spec;
    let mut agent = Agent::builder(&spec.name)
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .window(config.window)
        .mode(config.mode)
        .concurrency(spec.capacity)
        .pool_scope(spec.pool)
        .cpu_cores(f64::from(spec.cores))
        .exchange_timeout(Duration::from_millis(500))
        .mesh_keys(config.mesh_keys.clone())
        .sample(config.sample);
    if let Some((latency, percentile)) = config.slo {
        agent = agent.slo(latency, percentile);
    }
    agent
}

async fn serve(config: ReplicaConfig, usage: Arc<Usage>, ready: Ready, stop: oneshot::Receiver<Duration>) {
    if let Runtime::External { command } = &config.spec.runtime {
        let command = command.clone();
        return external::serve(config, &command, ready, stop).await;
    }
    let spec = &config.spec;
    let agent = agent_builder(&config);
    let started = async {
        let agent = agent.start().await.map_err(|e| Error::Start(e.to_string()))?;
        let callees = callee_clients(&config, &agent)?;
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| Error::Start(e.to_string()))?;
        let addr = listener.local_addr().map_err(|e| Error::Start(e.to_string()))?;
        Ok::<_, Error>((agent, callees, listener, addr))
    };
    let (agent, callees, listener, addr) = match started.await {
        Ok(started) => started,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let work = Arc::new(Work {
        spec: spec.clone(),
        control: config.control.clone(),
        usage: usage.clone(),
        pool: Mutex::new((spec.capacity, Arc::new(Semaphore::new(spec.capacity as usize)))),
        cores: VirtualCores::new(spec.cores, Instant::now()),
        cpu_model: config.cpu_model,
        random: Mutex::new(StdRng::seed_from_u64(config.seed)),
        callees,
    });
    let ingress = IngressLayer { control: config.control.clone(), usage: usage.clone() };
    let (shutdown, shutting_down) = watch::channel(false);
    let mut until_shutdown = shutting_down.clone();
    let until_shutdown = async move {
        let _ = until_shutdown.wait_for(|stop| *stop).await;
    };
    let server = match spec.protocol {
        Protocol::Http => {
            let app = http_router(work.clone()).layer(agent.server_layer()).layer(ingress);
            tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(until_shutdown).await })
        }
        Protocol::Grpc => {
            let router = tonic::transport::Server::builder()
                .layer(ingress)
                .layer(agent.server_layer())
                .add_service(grpc_service(work.clone()));
            // Without TCP_NODELAY, a response's frames can sit out a delayed ACK: tens of milliseconds that
            // callers would measure as network time.
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(async move {
                router.serve_with_incoming_shutdown(incoming, until_shutdown).await.map_err(std::io::Error::other)
            })
        }
    };
    let _ = ready.send(Ok((addr, agent.local_addr(), agent.view())));
    // Told to stop (or dropped): the callers have already dropped this replica. Wait for the requests it has,
    // then a quiet moment for any that were dispatched just before the callers heard, then shut down.
    let deadline = stop.await.unwrap_or(Duration::ZERO);
    let give_up = Instant::now() + deadline;
    let mut quiet_since = Instant::now();
    while Instant::now() < give_up {
        if usage.in_flight.load(Ordering::Acquire) > 0 {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_millis(150) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = shutdown.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    agent.shutdown(Duration::from_millis(200)).await;
}

impl Replica {
    /// Starts a replica on a thread of its own and waits until it listens.
    pub fn start(id: u32, config: ReplicaConfig) -> Result<Self, Error> {
        let (ready, ready_receiver) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel();
        let usage = Arc::new(Usage::default());
        let thread_usage = usage.clone();
        let name = format!("{}-{id}", config.spec.name);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime.block_on(serve(config, thread_usage, ready, stopped)),
                    Err(error) => {
                        let _ = ready.send(Err(Error::Start(error.to_string())));
                    }
                };
            })
            .map_err(|e| Error::Start(e.to_string()))?;
        let (addr, agent_addr, view) =
            ready_receiver.recv().map_err(|_| Error::Start("the replica's thread ended".into()))??;
        Ok(Self { id, addr, agent_addr, view, usage, stop: Some(stop), thread: Some(thread) })
    }

    /// Drains (waits up to `deadline` for its requests to finish) and stops; blocks until it has.
    pub fn stop(mut self, deadline: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(deadline);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Duration::ZERO);
        }
    }
}

/// A client for the load generator: HTTP to the entry's replicas, balanced, uninstrumented (external traffic).
pub fn entry_client(
    registry: watch::Receiver<Replicas>,
) -> Balanced<http::Request<Empty<Bytes>>, http::Response<Incoming>> {
    balance::http_client(registry)
}

/// Reads a response to the end.
pub async fn read_to_end(response: http::Response<Incoming>) -> Result<(), BoxError> {
    let ok = response.status().is_success();
    response.into_body().collect().await?;
    if ok { Ok(()) } else { Err("the entry failed the request".into()) }
}
