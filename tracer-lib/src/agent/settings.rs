//! The agent's settings: built-in defaults, then the environment (as Kubernetes' downward API fills it), then code.
//! Starting the agent is [`crate::agent::start`]'s.
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
//! | `ROOTSCALE_POOL_SCOPE` | `own` (a worker for the service's own work) or `request` (for the whole request) | `own` |
//! | `ROOTSCALE_SAMPLE` | measure up to 16 requests a window (the first of each sixteenth), then one in N (`1/16`) | `1` (every request) |
//! | `ROOTSCALE_AGENT_TOKEN` | shared token required on the agent's gRPC calls | none |
//! | `ROOTSCALE_AGENT_TLS_CERT` / `_KEY` / `_CA` | PEM files: serve and call over mutual TLS | none |
//! | `ROOTSCALE_AGENT_TLS_SERVER_NAME` | the name other agents' certificates are checked against | the address |
//! | `ROOTSCALE_MESH_KEY_FILE` | the mesh key file (one key per line; reloaded each window) | none |
//! | `ROOTSCALE_OPERATOR_IDENTITY` | the DNS name in the operator's client certificate | `rootscale-operator` |

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

/// How long a report to a neighbour may take, by default.
pub const DEFAULT_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(1);
/// Neighbour services tracked at most, by default.
pub const DEFAULT_MAX_NEIGHBORS: usize = 256;

use crate::{
    Error, Observer,
    decide::{AggregationMode, PolicyConfig, PoolScope, Slo},
    identity::{KeyRing, peer::DEFAULT_OPERATOR_IDENTITY},
    measure::{
        headers::valid_service_name,
        sample::{BadSampleRate, SampleRate},
    },
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
    pub(crate) pool_scope: PoolScope,
    pub(crate) token: Option<String>,
    pub(crate) tls: Option<TlsFiles>,
    pub(crate) exchange_timeout: Duration,
    pub(crate) max_neighbors: usize,
    pub(crate) observer: Option<Arc<dyn Observer>>,
    /// Metrics of the process hosting the agent (a sidecar's own counters), served beside the agent's.
    pub(crate) extra_metrics: Vec<Arc<dyn prometheus_client::collector::Collector>>,
    pub(crate) cpu_cores: Option<f64>,
    pub(crate) mesh_keys: Option<Arc<KeyRing>>,
    pub(crate) operator_identity: String,
    pub(crate) sample: SampleRate,
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
            pool_scope: PoolScope::Own,
            token: None,
            tls: None,
            exchange_timeout: DEFAULT_EXCHANGE_TIMEOUT,
            max_neighbors: DEFAULT_MAX_NEIGHBORS,
            observer: None,
            extra_metrics: Vec::new(),
            cpu_cores: None,
            mesh_keys: None,
            operator_identity: DEFAULT_OPERATOR_IDENTITY.to_string(),
            sample: SampleRate::ALL,
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
        builder.advertise = match (env("ROOTSCALE_AGENT_ADDR"), env("POD_IP")) {
            (Some(addr), _) => Some(addr),
            (None, Some(ip)) => Some(advertised_at(&ip, builder.listen.port())?),
            (None, None) => None,
        };
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
        if let Some(scope) = env("ROOTSCALE_POOL_SCOPE") {
            builder.pool_scope =
                scope.parse().map_err(|_| bad("ROOTSCALE_POOL_SCOPE", &scope, "expected own or request"))?;
        }
        if let Some(sample) = env("ROOTSCALE_SAMPLE") {
            builder.sample =
                sample.parse().map_err(|error: BadSampleRate| bad("ROOTSCALE_SAMPLE", &sample, &error.to_string()))?;
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
        if let Some(path) = env("ROOTSCALE_MESH_KEY_FILE") {
            let keys = KeyRing::from_file(&path)
                .map_err(|error| Error::Config(format!("ROOTSCALE_MESH_KEY_FILE={path:?}: {error}")))?;
            builder.mesh_keys = Some(Arc::new(keys));
        }
        if let Some(identity) = env("ROOTSCALE_OPERATOR_IDENTITY") {
            builder.operator_identity = identity;
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

    /// How long a request holds one of the pool's workers: [`PoolScope::Request`] for a thread-per-request
    /// service, whose workers wait on its callees too. Record the queueing for a worker with
    /// [`crate::RequestHandle::record_pool_wait`].
    pub fn pool_scope(mut self, scope: PoolScope) -> Self {
        self.pool_scope = scope;
        self
    }

    /// Measures a reservoir of requests each window and one in N of the rest rather than every one (see
    /// [`crate::measure::sample`]).
    pub fn sample(mut self, rate: SampleRate) -> Self {
        self.sample = rate;
        self
    }

    /// Requires `authorization: Bearer <token>` on the agent's Neighbor and Advisor calls, and sends it to others.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    /// Mutual TLS on the agent's port and on its calls to other agents.
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// The mesh key: the in-band headers and the reports carry proofs made with it, and only members' are
    /// believed (docs/DESIGN.md §1.6).
    pub fn mesh_keys(mut self, keys: Arc<KeyRing>) -> Self {
        self.mesh_keys = Some(keys);
        self
    }

    /// The DNS name in the operator's client certificate (with TLS): its `Advisor` calls may change this agent's
    /// settings; other members' only get answers (default `rootscale-operator`).
    pub fn operator_identity(mut self, name: &str) -> Self {
        self.operator_identity = name.to_string();
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

    /// Serves `collector`'s metrics on the agent's `/metrics` too, read on each scrape: for the process that hosts
    /// the agent (the sidecar's counters), so one scrape target has them all.
    pub fn extra_metrics(mut self, collector: Arc<dyn prometheus_client::collector::Collector>) -> Self {
        self.extra_metrics.push(collector);
        self
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
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
        if rustls_pki_types::ServerName::try_from(self.operator_identity.as_str()).is_err() {
            return Err(Error::Config(format!("operator identity {:?} is not a DNS name", self.operator_identity)));
        }
        Ok(())
    }
}
/// The agent's address at the pod's IP (`POD_IP`, from the downward API): `ip:port`, with an IPv6 address in
/// brackets.
fn advertised_at(ip: &str, port: u16) -> Result<String, Error> {
    let ip: std::net::IpAddr = ip.parse().map_err(|_| bad("POD_IP", ip, "expected an IPv4 or IPv6 address"))?;
    Ok(std::net::SocketAddr::new(ip, port).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_ip_becomes_an_address_neighbours_can_dial() {
        assert_eq!(advertised_at("127.0.0.9", 9797).unwrap(), "127.0.0.9:9797");
        let v6 = advertised_at("::ffff:127.0.0.9", 9797).unwrap();
        assert_eq!(v6, "[::ffff:127.0.0.9]:9797");
        assert!(crate::measure::headers::valid_agent_addr(&v6), "the header parser takes it");
        let error = advertised_at("not-an-ip", 9797).unwrap_err().to_string();
        assert!(error.contains("POD_IP") && error.contains("IPv4 or IPv6"), "{error}");
    }
}
