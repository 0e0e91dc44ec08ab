//! rootscale's sidecar: a service that cannot link `rootscale-tracer` (Go, Java, Python, Node…) takes part in the
//! exchange through a proxy beside it, which measures the service from outside with the tracer's own layers and
//! hosts its agent — the same headers, reports, verdicts and `Advisor` as a linked service (docs/DESIGN.md §1.8).
//!
//! In the order a request flows:
//! 1. [`inbound`]: callers reach the application through the proxy's inbound port. The tracer's server layer
//!    measures the request (its `total`, as seen from the proxy) and answers the caller's `rootscale-caller` with
//!    `rootscale-timing`; the request is registered under its W3C trace context before it is forwarded.
//! 2. [`correlate`]: the open inbound requests by trace id, so a call the application makes while serving one is
//!    counted toward it.
//! 3. [`outbound`]: the application's calls go through the proxy's HTTP proxy port (`HTTP_PROXY`), or (HTTP/2,
//!    gRPC) a local port per callee. Each is
//!    measured by the tracer's client layer inside the inbound request its `traceparent` names, so the request's
//!    local wait is its total minus the critical path of its calls, as in a linked service.
//!
//! [`config`] reads the settings; [`Proxy`] wires the ports to a running agent; [`inject`] adds the sidecar to
//! Kubernetes manifests. Nothing here fails the
//! application's traffic because rootscale had a problem: what cannot be correlated is forwarded and counted.

pub mod config;
pub mod correlate;
pub mod inbound;
pub mod inject;
pub mod outbound;

mod conn;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};
use rootscale_tracer::{Agent, Tracer};
use tokio::{net::TcpListener, task::JoinHandle};

pub use config::{ProxyConfig, Routes};
pub use conn::FIRST_BYTES_WITHIN;

/// What can go wrong starting the proxy. Once it runs, nothing on the request path returns an error to the
/// application that it would not have had without the proxy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting that cannot be used; the message names it.
    #[error("proxy configuration: {0}")]
    Config(String),
    #[error("cannot bind the {port} port at {addr}: {error}")]
    Bind { port: &'static str, addr: SocketAddr, error: std::io::Error },
    #[error(transparent)]
    Agent(#[from] rootscale_tracer::Error),
}

/// What the proxy did that rootscale could not measure as it should, and what it could not forward.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    /// Outbound calls tied to the inbound request their trace context named.
    pub correlated: AtomicU64,
    /// Outbound calls forwarded without a request to count them toward: no `traceparent`, or one no open inbound
    /// request has.
    pub uncorrelated: AtomicU64,
    /// Outbound calls whose trace context matched more than one open request and could not tell which.
    pub ambiguous: AtomicU64,
    /// Outbound calls whose trace context named a request that had ended (abandoned by its caller).
    pub after_request: AtomicU64,
    /// Inbound requests forwarded without being registered, because the correlation map was full.
    pub map_full: AtomicU64,
    /// Requests answered 502 because the application or the callee could not be reached.
    pub upstream_errors: AtomicU64,
    /// Outbound requests refused because they named no callee the proxy could reach.
    pub refused: AtomicU64,
    /// Inbound connections that did not speak HTTP (or stayed silent, as when the server speaks first), passed to
    /// the application byte for byte and not measured.
    pub passthrough: AtomicU64,
    /// Connections switched to another protocol after a 101 (WebSocket), joined byte for byte.
    pub upgraded: AtomicU64,
    /// `CONNECT` tunnels from the application to a callee, joined byte for byte.
    pub tunnels: AtomicU64,
}

impl ProxyCounters {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Served on the agent's `/metrics` (give the counters to [`AgentBuilder::extra_metrics`](rootscale_tracer::AgentBuilder::extra_metrics)).
impl Collector for ProxyCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let read = |counter: &AtomicU64| ConstCounter::new(counter.load(Ordering::Relaxed));
        {
            let mut calls = encoder.encode_descriptor(
                "rootscale_proxy_outbound_calls",
                "The application's calls, by whether their trace context tied them to an inbound request",
                None,
                MetricType::Counter,
            )?;
            for (tie, counter) in [
                ("correlated", &self.correlated),
                ("uncorrelated", &self.uncorrelated),
                ("ambiguous", &self.ambiguous),
                ("after_request", &self.after_request),
            ] {
                read(counter).encode(calls.encode_family(&[("correlation", tie)])?)?;
            }
        }
        for (name, help, counter) in [
            (
                "rootscale_proxy_unregistered_requests",
                "Inbound requests forwarded unregistered because the correlation map was full",
                &self.map_full,
            ),
            (
                "rootscale_proxy_upstream_errors",
                "Requests answered 502 (or connections dropped) because the application or a callee could not be reached",
                &self.upstream_errors,
            ),
            (
                "rootscale_proxy_refused",
                "Outbound requests refused: no host named, or a loop into the proxy",
                &self.refused,
            ),
            (
                "rootscale_proxy_passthrough_connections",
                "Inbound connections that did not speak HTTP, passed to the application unmeasured",
                &self.passthrough,
            ),
            (
                "rootscale_proxy_upgraded_connections",
                "Connections switched to another protocol (101, a WebSocket) and joined byte for byte",
                &self.upgraded,
            ),
            ("rootscale_proxy_connect_tunnels", "CONNECT tunnels from the application to a callee", &self.tunnels),
        ] {
            read(counter).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        Ok(())
    }
}

/// A running proxy: its inbound and outbound ports.
pub struct Proxy {
    inbound: SocketAddr,
    outbound: SocketAddr,
    callee_ports: BTreeMap<String, SocketAddr>,
    counters: Arc<ProxyCounters>,
    correlator: Arc<correlate::Correlator>,
    tasks: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Binds the ports and serves them on the current runtime, measuring with `agent`'s layers.
    pub async fn start(config: &ProxyConfig, agent: &Agent) -> Result<Self, Error> {
        Self::start_counting(config, agent.tracer(), Arc::default()).await
    }

    /// The same, measuring with `tracer`'s layers (an agent's, or — when the agent could not start — a tracer of
    /// its own, so the traffic goes on) and counting into `counters` (those the agent serves on `/metrics`).
    pub async fn start_counting(
        config: &ProxyConfig,
        tracer: &Tracer,
        counters: Arc<ProxyCounters>,
    ) -> Result<Self, Error> {
        config.check()?;
        let bind = |port: &'static str, addr: SocketAddr| async move {
            let listener = TcpListener::bind(addr).await.map_err(|error| Error::Bind { port, addr, error })?;
            let local = listener.local_addr().map_err(|error| Error::Bind { port, addr, error })?;
            Ok::<_, Error>((listener, local))
        };
        let (inbound_listener, inbound) = bind("inbound", config.inbound).await?;
        let (outbound_listener, outbound) = bind("outbound", config.outbound).await?;
        let mut callee_listeners = Vec::new();
        for (name, addr) in &config.callee_ports {
            let (listener, local) = bind("callee", *addr).await?;
            callee_listeners.push((name.clone(), listener, local));
        }
        let correlator = Arc::new(correlate::Correlator::new(config.max_open));
        let own = [inbound, outbound].into_iter().chain(callee_listeners.iter().map(|(_, _, local)| *local)).collect();
        let shared = outbound::Shared::new(tracer, config.routes.clone(), correlator.clone(), counters.clone(), own);
        let mut tasks = vec![
            tokio::spawn(conn::serve(
                inbound_listener,
                inbound::service(tracer, config.app, correlator.clone(), counters.clone()),
                Some(conn::Passthrough { app: config.app, counters: counters.clone() }),
            )),
            tokio::spawn(conn::serve(outbound_listener, outbound::service(shared.clone()), None)),
        ];
        let mut callee_ports = BTreeMap::new();
        for (name, listener, local) in callee_listeners {
            let service = outbound::callee_service(shared.clone(), &name)
                .ok_or_else(|| Error::Config(format!("`{name}` has a port but no route")))?;
            tasks.push(tokio::spawn(conn::serve(listener, service, None)));
            callee_ports.insert(name, local);
        }
        tracing::info!(%inbound, %outbound, app = %config.app, "proxy serving");
        Ok(Self { inbound, outbound, callee_ports, counters, correlator, tasks })
    }

    /// Where the application reaches callee `name` on a port of its own, if it has one.
    pub fn callee_addr(&self, name: &str) -> Option<SocketAddr> {
        self.callee_ports.get(name).copied()
    }

    /// Where callers reach the application.
    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound
    }

    /// The HTTP proxy port the application calls out through.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound
    }

    pub fn counters(&self) -> &ProxyCounters {
        &self.counters
    }

    /// Inbound requests registered for correlation now.
    pub fn correlator_open(&self) -> usize {
        self.correlator.open()
    }

    /// Stops accepting connections (those open are dropped).
    pub fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}
