//! The agent's settings: built-in defaults, then the environment (as Kubernetes' downward API fills it), then code.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `ROOTSCALE_SERVICE` | this service's name | required |
//! | `ROOTSCALE_AGENT_LISTEN` | where the agent's gRPC port binds | `0.0.0.0:9797` |
//! | `ROOTSCALE_AGENT_ADDR` | the address neighbours reach it at | `$POD_IP:<port>`, else the bound address |
//! | `ROOTSCALE_WINDOW` | window length | `5s` |
//! | `ROOTSCALE_MODE` | `max` or `sum` | `max` |
//! | `ROOTSCALE_TRIGGER` | fraction of the SLO that starts a search | `0.8` |
//! | `ROOTSCALE_SLO` / `ROOTSCALE_SLO_PERCENTILE` | an entry service's SLO, for use without the operator | none / `95` |
//! | `ROOTSCALE_CONCURRENCY` | requests one replica serves at once (its pool), for Little's law | none |
//! | `ROOTSCALE_AGENT_TOKEN` | shared token required on the agent's gRPC calls | none |
//! | `ROOTSCALE_AGENT_TLS_CERT` / `_KEY` / `_CA` | PEM files: serve and call over TLS | none |

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{oneshot, watch};

use crate::{
    Error, Observer, Tracer,
    agent::{Agent, grpc, state::AgentState},
    decide::{AggregationMode, Capacity, PolicyConfig, Slo},
    exchange::sender::Sender,
    measure::headers::{valid_agent_addr, valid_service_name},
};

/// The default agent port.
pub const DEFAULT_AGENT_PORT: u16 = 9797;

/// PEM files for TLS on the agent's port and on its calls to other agents.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// The CA that signed the other agents' certificates (and theirs: TLS is mutual).
    pub ca: std::path::PathBuf,
    /// The name other agents' certificates are checked against; without it, the address dialled (which then
    /// needs an IP SAN for every pod).
    pub server_name: Option<String>,
}

/// Builds and starts an [`Agent`].
#[derive(Clone)]
pub struct AgentBuilder {
    pub(crate) service: String,
    pub(crate) listen: SocketAddr,
    pub(crate) advertise: Option<String>,
    pub(crate) window: Duration,
    pub(crate) policy: PolicyConfig,
    pub(crate) slo: Option<Slo>,
    pub(crate) concurrency: Option<f64>,
    pub(crate) token: Option<String>,
    pub(crate) tls: Option<TlsFiles>,
    pub(crate) exchange_timeout: Duration,
    pub(crate) max_neighbors: usize,
    pub(crate) observer: Option<Arc<dyn Observer>>,
    pub(crate) cpu_cores: Option<f64>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

fn bad(name: &str, value: &str, expected: &str) -> Error {
    Error::Config(format!("{name}={value:?}: {expected}"))
}

fn parse_duration(name: &str, value: &str) -> Result<Duration, Error> {
    humantime::parse_duration(value).map_err(|_| bad(name, value, "expected a duration such as 5s or 200ms"))
}

fn parse_fraction(name: &str, value: &str) -> Result<f64, Error> {
    match value.parse::<f64>() {
        Ok(fraction) if fraction > 0.0 && fraction <= 1.0 => Ok(fraction),
        _ => Err(bad(name, value, "expected a number in (0, 1]")),
    }
}

impl AgentBuilder {
    /// Built-in defaults for `service`.
    pub fn new(service: &str) -> Self {
        Self {
            service: service.to_string(),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_AGENT_PORT),
            advertise: None,
            window: crate::DEFAULT_WINDOW,
            policy: PolicyConfig::default(),
            slo: None,
            concurrency: None,
            token: None,
            tls: None,
            exchange_timeout: Duration::from_secs(1),
            max_neighbors: 256,
            observer: None,
            cpu_cores: None,
        }
    }

    /// Defaults, then the `ROOTSCALE_*` environment. A variable that is set but malformed is an error naming it.
    pub fn from_env() -> Result<Self, Error> {
        let service = env("ROOTSCALE_SERVICE")
            .ok_or_else(|| Error::Config("ROOTSCALE_SERVICE is not set: name this service".into()))?;
        let mut builder = Self::new(&service);
        if let Some(listen) = env("ROOTSCALE_AGENT_LISTEN") {
            builder.listen = listen.parse().map_err(|_| bad("ROOTSCALE_AGENT_LISTEN", &listen, "expected ip:port"))?;
        }
        builder.advertise =
            env("ROOTSCALE_AGENT_ADDR").or_else(|| env("POD_IP").map(|ip| format!("{ip}:{}", builder.listen.port())));
        if let Some(window) = env("ROOTSCALE_WINDOW") {
            builder.window = parse_duration("ROOTSCALE_WINDOW", &window)?;
        }
        if let Some(mode) = env("ROOTSCALE_MODE") {
            builder.policy.mode = mode.parse().map_err(|_| bad("ROOTSCALE_MODE", &mode, "expected max or sum"))?;
        }
        if let Some(trigger) = env("ROOTSCALE_TRIGGER") {
            builder.policy.trigger_fraction = parse_fraction("ROOTSCALE_TRIGGER", &trigger)?;
        }
        if let Some(slo) = env("ROOTSCALE_SLO") {
            let latency = parse_duration("ROOTSCALE_SLO", &slo)?;
            let percentile = match env("ROOTSCALE_SLO_PERCENTILE") {
                Some(p) => match p.parse::<f64>() {
                    Ok(value) if value > 0.0 && value <= 100.0 => value,
                    _ => return Err(bad("ROOTSCALE_SLO_PERCENTILE", &p, "expected a percentile in (0, 100]")),
                },
                None => 95.0,
            };
            builder = builder.slo(latency, percentile);
        }
        if let Some(concurrency) = env("ROOTSCALE_CONCURRENCY") {
            match concurrency.parse::<u32>() {
                Ok(value) if value > 0 => builder.concurrency = Some(f64::from(value)),
                _ => return Err(bad("ROOTSCALE_CONCURRENCY", &concurrency, "expected a whole number above 0")),
            }
        }
        builder.token = env("ROOTSCALE_AGENT_TOKEN");
        match (env("ROOTSCALE_AGENT_TLS_CERT"), env("ROOTSCALE_AGENT_TLS_KEY"), env("ROOTSCALE_AGENT_TLS_CA")) {
            (None, None, None) => {}
            (Some(cert), Some(key), Some(ca)) => {
                builder.tls = Some(TlsFiles {
                    cert: cert.into(),
                    key: key.into(),
                    ca: ca.into(),
                    server_name: env("ROOTSCALE_AGENT_TLS_SERVER_NAME"),
                })
            }
            _ => {
                return Err(Error::Config(
                    "set all of ROOTSCALE_AGENT_TLS_CERT, ROOTSCALE_AGENT_TLS_KEY and ROOTSCALE_AGENT_TLS_CA, or none"
                        .into(),
                ));
            }
        }
        Ok(builder)
    }

    pub fn service(mut self, service: &str) -> Self {
        self.service = service.to_string();
        self
    }

    /// Where the agent's gRPC port binds (port 0 picks a free one).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The address neighbours reach this agent at (default: the bound address, or `$POD_IP:<port>`).
    pub fn advertise(mut self, addr: &str) -> Self {
        self.advertise = Some(addr.to_string());
        self
    }

    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    pub fn mode(mut self, mode: AggregationMode) -> Self {
        self.policy.mode = mode;
        self
    }

    pub fn trigger_fraction(mut self, fraction: f64) -> Self {
        self.policy.trigger_fraction = fraction;
        self
    }

    /// The rule's other knobs.
    pub fn policy(mut self, policy: PolicyConfig) -> Self {
        self.policy = policy;
        self
    }

    /// This service's SLO, for use without the operator (the operator's `Advisor` calls override it).
    pub fn slo(mut self, latency: Duration, percentile: f64) -> Self {
        self.slo = Some(Slo { latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX), percentile });
        self
    }

    /// Requests one replica serves at once (a worker or connection pool), for Little's law.
    pub fn concurrency(mut self, concurrency: u32) -> Self {
        self.concurrency = Some(f64::from(concurrency));
        self
    }

    /// Requires `authorization: Bearer <token>` on the agent's Neighbor and Advisor calls, and sends it to others.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// How long a report to a neighbour may take (default 1 s).
    pub fn exchange_timeout(mut self, timeout: Duration) -> Self {
        self.exchange_timeout = timeout;
        self
    }

    /// The CPU one replica has, in cores (default: cgroup `cpu.max`, else the runtime's worker threads).
    pub fn cpu_cores(mut self, cores: f64) -> Self {
        self.cpu_cores = Some(cores);
        self
    }

    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    fn check(&self) -> Result<(), Error> {
        if !valid_service_name(&self.service) {
            return Err(Error::InvalidServiceName(self.service.clone()));
        }
        let policy = &self.policy;
        if !(policy.trigger_fraction > 0.0 && policy.trigger_fraction <= 1.0) {
            return Err(Error::Config(format!("trigger fraction {} is not in (0, 1]", policy.trigger_fraction)));
        }
        if !(policy.target_utilization > 0.0 && policy.target_utilization <= 1.0) {
            return Err(Error::Config(format!("target utilisation {} is not in (0, 1]", policy.target_utilization)));
        }
        if let Some(slo) = self.slo
            && (slo.latency_us == 0 || !(slo.percentile > 0.0 && slo.percentile <= 100.0))
        {
            return Err(Error::Config(format!("SLO {slo:?} needs a latency above 0 and a percentile in (0, 100]")));
        }
        if self.cpu_cores.is_some_and(|cores| !(cores.is_finite() && cores > 0.0)) {
            return Err(Error::Config(format!("cpu cores {:?} must be a positive number", self.cpu_cores)));
        }
        if self.token.as_ref().is_some_and(|token| token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic())) {
            return Err(Error::Config("the agent token must be non-empty visible ASCII".into()));
        }
        Ok(())
    }

    /// Binds the agent's port, builds the service's tracer and starts the agent on a thread of its own, so a
    /// service that saturates its own runtime cannot starve the agent that is to report it.
    pub async fn start(self) -> Result<Agent, Error> {
        self.check()?;
        // Measured on the caller's runtime: the service's own CPU, not the agent's thread.
        let mut capacity = Capacity::detect(self.concurrency);
        if let Some(cores) = self.cpu_cores {
            capacity.cores = cores;
        }
        if self.token.is_some() && self.tls.is_none() {
            tracing::warn!(
                "the agent token travels in clear text to agent addresses learned in-band; configure TLS to protect it"
            );
        }
        let (ready, started) = oneshot::channel();
        let (stop, stopped) = watch::channel(false);
        let (finished, done) = oneshot::channel();
        let thread = std::thread::Builder::new().name(format!("rootscale-agent-{}", self.service));
        thread
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready.send(Err(Error::Config(format!("cannot start the agent's runtime: {error}"))));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut stopped_after = stopped.clone();
                    match self.launch(capacity, stopped).await {
                        Ok((tracer, state, local_addr, tasks)) => {
                            let _ = ready.send(Ok((tracer, state, local_addr)));
                            crate::agent::stop_requested(&mut stopped_after).await;
                            for task in tasks {
                                let _ = task.await;
                            }
                        }
                        Err(error) => {
                            let _ = ready.send(Err(error));
                        }
                    }
                });
                let _ = finished.send(());
            })
            .map_err(|error| Error::Config(format!("cannot start the agent's thread: {error}")))?;
        let (tracer, state, local_addr) =
            started.await.map_err(|_| Error::Config("the agent's thread ended while starting".into()))??;
        Ok(Agent { tracer, state, local_addr, stop, done })
    }

    /// Runs on the agent's own runtime: binds, builds the tracer, spawns the window closer, the window task and the
    /// gRPC server.
    async fn launch(
        self,
        capacity: Capacity,
        stopped: watch::Receiver<bool>,
    ) -> Result<(Tracer, Arc<AgentState>, SocketAddr, Vec<tokio::task::JoinHandle<()>>), Error> {
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|error| Error::Bind { addr: self.listen, error })?;
        let local_addr = listener.local_addr().map_err(|error| Error::Bind { addr: self.listen, error })?;
        let advertise = match &self.advertise {
            Some(addr) => addr.clone(),
            None if local_addr.ip().is_unspecified() => format!("127.0.0.1:{}", local_addr.port()),
            None => local_addr.to_string(),
        };
        if !valid_agent_addr(&advertise) {
            return Err(Error::InvalidAgentAddress(advertise));
        }
        let mut tracer = Tracer::builder(self.service.clone()).agent_addr(advertise.clone()).window(self.window);
        if let Some(observer) = &self.observer {
            tracer = tracer.observer(observer.clone());
        }
        let tracer = tracer.build()?;
        let tls = match &self.tls {
            Some(files) => Some(grpc::Tls::load(files)?),
            None => None,
        };
        let sender = Sender::new(self.exchange_timeout, self.token.as_deref(), tls.as_ref().map(grpc::Tls::client))?;
        let state = Arc::new(AgentState::new(tracer.clone(), &self, advertise.clone(), capacity, sender));
        let mut tasks = Vec::new();
        let closer = tracer.run_window_closer();
        let mut closer_stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = closer => {}
                () = crate::agent::stop_requested(&mut closer_stopped) => {}
            }
        }));
        tasks.push(tokio::spawn(crate::agent::state::run_windows(state.clone(), stopped.clone())));
        let server = grpc::serve(state.clone(), listener, self.token.clone(), tls, stopped)?;
        tasks.push(tokio::spawn(server));
        tracing::info!(service = %self.service, agent = %advertise, %local_addr, "rootscale agent started");
        Ok((tracer, state, local_addr, tasks))
    }
}
