//! Topology files: the services of a local run, how they call each other, what one replica of each can do, the
//! SLO at the entry, and the demo's default load and faults.
//!
//! Files are untrusted input: parsed strictly (unknown fields are errors), bounded (size, services, calls,
//! replicas), and every error names the line it is about. Nothing starts until a file is valid.
//!
//! ```yaml
//! name: shop
//! entry: frontend
//! slo: 120ms                  # at p95 (slo_percentile)
//! services:
//!   - name: frontend
//!     protocol: http          # or grpc
//!     capacity: 32            # worker-pool slots per replica
//!     pool: own               # a slot for the service's own work (default), or `request`: for the whole
//!                             # request, calls included (a thread-per-request service)
//!     cores: 1                # virtual cores per replica (default 1)
//!     cpu: 1ms                # CPU time per request, on a virtual core
//!     service_time: {distribution: exponential, mean: 2ms}   # time holding a worker, off the CPU
//!     max_replicas: 8
//!     calls:
//!       - call: catalog                  # one call, then...
//!       - parallel: [cart, recommend]    # ...these at once
//!       - call: checkout
//!         probability: 0.3
//!   - name: search                     # a program of your own, in any language, behind rootscale-proxy
//!     protocol: http
//!     runtime: external
//!     command: [python3, examples/python/service.py]
//!     capacity: 8                      # its pool, for the agent (and SERVICE_POOL)
//!     service_time: {distribution: constant, value: 5ms}   # SERVICE_WORK_MS, for programs that model work
//!     calls:
//!       - call: catalog                # a route for each callee it may call
//! demo:
//!   rate: 150
//!   duration: 60s
//!   faults: [catalog=cpu:4@15s]
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::Duration,
};

use serde::Deserialize;
use serde_saphyr::Spanned;

use rootscale_tracer::decide::PoolScope;

use crate::local::{Error, scenario::Fault};

/// Largest topology file read.
pub const MAX_FILE_BYTES: usize = 256 * 1024;
const MAX_SERVICES: usize = 64;
const MAX_STEPS: usize = 32;
const MAX_PARALLEL: usize = 16;
const MAX_CAPACITY: i64 = 10_000;
const MAX_REPLICAS: i64 = 100;
const MAX_CORES: f64 = 64.0;
const MAX_WORK: Duration = Duration::from_secs(10);
/// An external service's command: at most this many arguments, each at most this long.
const MAX_COMMAND_ARGS: usize = 64;
const MAX_COMMAND_ARG_BYTES: usize = 4096;

/// How a service is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

/// How long a request holds a worker, off the CPU (I/O, locks, a database).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ServiceTime {
    Constant(Duration),
    Exponential { mean: Duration },
    LogNormal { median: Duration, sigma: f64 },
}

impl ServiceTime {
    /// The mean, for budgets.
    pub fn mean(&self) -> Duration {
        match *self {
            ServiceTime::Constant(value) => value,
            ServiceTime::Exponential { mean } => mean,
            ServiceTime::LogNormal { median, sigma } => median.mul_f64((sigma * sigma / 2.0).exp()),
        }
    }
}

/// One step of a request's work after its own: a call, or calls made at once.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// One callee: a call; several: calls made in parallel.
    pub callees: Vec<String>,
    /// The chance a request makes this step at all.
    pub probability: f64,
}

/// What runs a replica.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Runtime {
    /// Local mode's own server, linked with the tracer, doing the modelled work.
    #[default]
    Modelled,
    /// A program of the user's (`command`, run once per replica) behind `rootscale-proxy`: it listens on `PORT`,
    /// calls its callees by name through `HTTP_PROXY` (see `local::external`).
    External { command: Vec<String> },
}

/// One service: what a replica of it does and can do.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    pub protocol: Protocol,
    /// Worker-pool slots per replica: requests in their own work (or, for a `request` pool, anywhere) at once.
    pub capacity: u32,
    /// How long a request holds its slot.
    pub pool: PoolScope,
    /// Virtual cores per replica; CPU time is spent holding one.
    pub cores: u32,
    pub cpu: Duration,
    pub service_time: ServiceTime,
    pub replicas: u32,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// This service's share of the SLO (given, or derived from the SLO by expected latency).
    pub budget: Duration,
    pub steps: Vec<Step>,
    pub runtime: Runtime,
}

/// The demo's defaults for a topology.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoDefaults {
    pub rate: f64,
    pub duration: Duration,
    /// Faults the benchmark injects one at a time; the first is the demo's default.
    pub faults: Vec<Fault>,
}

/// A validated topology.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    pub name: String,
    pub entry: String,
    pub slo: Duration,
    pub slo_percentile: f64,
    pub services: Vec<ServiceSpec>,
    pub demo: DemoDefaults,
}

// The file's shape. Every value a later check may reject is spanned, so the error can name its line.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: Spanned<String>,
    entry: Spanned<String>,
    slo: Spanned<String>,
    #[serde(default)]
    slo_percentile: Option<Spanned<f64>>,
    services: Vec<ServiceFile>,
    #[serde(default)]
    demo: Option<DemoFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    name: Spanned<String>,
    protocol: Spanned<String>,
    capacity: Spanned<i64>,
    #[serde(default)]
    pool: Option<Spanned<String>>,
    #[serde(default)]
    cores: Option<Spanned<i64>>,
    #[serde(default)]
    cpu: Option<Spanned<String>>,
    #[serde(default)]
    service_time: Option<Spanned<ServiceTimeFile>>,
    #[serde(default)]
    replicas: Option<Spanned<i64>>,
    #[serde(default)]
    min_replicas: Option<Spanned<i64>>,
    #[serde(default)]
    max_replicas: Option<Spanned<i64>>,
    #[serde(default)]
    budget: Option<Spanned<String>>,
    #[serde(default)]
    calls: Vec<StepFile>,
    #[serde(default)]
    runtime: Option<Spanned<String>>,
    #[serde(default)]
    command: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceTimeFile {
    distribution: String,
    #[serde(default)]
    mean: Option<String>,
    #[serde(default)]
    median: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    sigma: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    #[serde(default)]
    call: Option<Spanned<String>>,
    #[serde(default)]
    parallel: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    probability: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DemoFile {
    #[serde(default)]
    rate: Option<Spanned<f64>>,
    #[serde(default)]
    duration: Option<Spanned<String>>,
    #[serde(default)]
    faults: Vec<Spanned<String>>,
}

/// An error about one line of a file.
struct At(usize);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.0)
    }
}

fn at<T>(value: &Spanned<T>) -> At {
    At(value.referenced.line() as usize)
}

fn duration(value: &Spanned<String>, what: &str) -> Result<Duration, String> {
    let parsed = humantime::parse_duration(value.value.trim())
        .map_err(|e| format!("{}: {what} `{}` is not a duration like 5ms ({e})", at(value), value.value))?;
    if parsed > MAX_WORK {
        return Err(format!("{}: {what} {} is over the limit of {MAX_WORK:?}", at(value), value.value));
    }
    Ok(parsed)
}

fn count(value: &Spanned<i64>, what: &str, min: i64, max: i64) -> Result<u32, String> {
    if value.value < min || value.value > max {
        return Err(format!("{}: {what} is {}; it must be between {min} and {max}", at(value), value.value));
    }
    Ok(value.value as u32)
}

/// A DNS label, as Kubernetes service names and rootscale's headers require.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn service_time(value: &Spanned<ServiceTimeFile>) -> Result<ServiceTime, String> {
    let line = at(value);
    let file = &value.value;
    let parse = |field: &Option<String>, name: &str| -> Result<Duration, String> {
        let text =
            field.as_ref().ok_or_else(|| format!("{line}: a {} service_time needs `{name}`", file.distribution))?;
        let parsed = humantime::parse_duration(text.trim())
            .map_err(|e| format!("{line}: service_time {name} `{text}` is not a duration ({e})"))?;
        if parsed > MAX_WORK {
            return Err(format!("{line}: service_time {name} {text} is over the limit of {MAX_WORK:?}"));
        }
        Ok(parsed)
    };
    let unused = |fields: &[(&str, bool)]| -> Result<(), String> {
        match fields.iter().find(|(_, present)| *present) {
            Some((name, _)) => Err(format!("{line}: `{name}` does not apply to a {} service_time", file.distribution)),
            None => Ok(()),
        }
    };
    match file.distribution.as_str() {
        "constant" => {
            unused(&[
                ("mean", file.mean.is_some()),
                ("median", file.median.is_some()),
                ("sigma", file.sigma.is_some()),
            ])?;
            Ok(ServiceTime::Constant(parse(&file.value, "value")?))
        }
        "exponential" => {
            unused(&[
                ("value", file.value.is_some()),
                ("median", file.median.is_some()),
                ("sigma", file.sigma.is_some()),
            ])?;
            Ok(ServiceTime::Exponential { mean: parse(&file.mean, "mean")? })
        }
        "lognormal" => {
            unused(&[("value", file.value.is_some()), ("mean", file.mean.is_some())])?;
            let sigma = file.sigma.ok_or_else(|| format!("{line}: a lognormal service_time needs `sigma`"))?;
            if !(sigma.is_finite() && (0.0..=3.0).contains(&sigma)) {
                return Err(format!("{line}: service_time sigma {sigma} is not between 0 and 3"));
            }
            Ok(ServiceTime::LogNormal { median: parse(&file.median, "median")?, sigma })
        }
        other => Err(format!("{line}: unknown service_time distribution `{other}` (constant, exponential, lognormal)")),
    }
}

impl Topology {
    /// Reads and checks a topology file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, Error> {
        Self::parse_inner(text).map_err(|message| Error::Topology(format!("{origin}: {message}")))
    }

    /// Reads a topology file from disk.
    pub fn load(path: &std::path::Path) -> Result<Self, Error> {
        let origin = path.display().to_string();
        let metadata = std::fs::metadata(path).map_err(|e| Error::Topology(format!("{origin}: {e}")))?;
        if metadata.len() > MAX_FILE_BYTES as u64 {
            return Err(Error::Topology(format!(
                "{origin}: {} bytes is over the limit of {MAX_FILE_BYTES}",
                metadata.len()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::Topology(format!("{origin}: {e}")))?;
        Self::parse(&text, &origin)
    }

    fn parse_inner(text: &str) -> Result<Self, String> {
        if text.len() > MAX_FILE_BYTES {
            return Err(format!("{} bytes is over the limit of {MAX_FILE_BYTES}", text.len()));
        }
        let file: File = serde_saphyr::from_str(text).map_err(|e| {
            // The library's message starts with the line and column; its snippet follows on later lines.
            e.to_string().lines().next().unwrap_or("invalid YAML").trim_start_matches("error: ").to_string()
        })?;
        if !valid_name(&file.name.value) {
            return Err(format!("{}: name `{}` is not a DNS label", at(&file.name), file.name.value));
        }
        if file.services.is_empty() {
            return Err("no services".into());
        }
        if file.services.len() > MAX_SERVICES {
            return Err(format!("{} services is over the limit of {MAX_SERVICES}", file.services.len()));
        }
        let slo = duration(&file.slo, "slo")?;
        if slo.is_zero() {
            return Err(format!("{}: slo must be above zero", at(&file.slo)));
        }
        let slo_percentile = match &file.slo_percentile {
            Some(p) if !(p.value > 0.0 && p.value < 100.0) => {
                return Err(format!("{}: slo_percentile {} is not in (0, 100)", at(p), p.value));
            }
            Some(p) => p.value,
            None => 95.0,
        };
        // Names first, so calls can be checked against all of them.
        let mut lines: BTreeMap<String, At> = BTreeMap::new();
        for service in &file.services {
            let name = &service.name;
            if !valid_name(&name.value) {
                return Err(format!("{}: service name `{}` is not a DNS label", at(name), name.value));
            }
            if let Some(first) = lines.get(&name.value) {
                return Err(format!("{}: service `{}` is already defined on {first}", at(name), name.value));
            }
            lines.insert(name.value.clone(), at(name));
        }
        if !lines.contains_key(&file.entry.value) {
            return Err(format!("{}: the entry `{}` is not one of the services", at(&file.entry), file.entry.value));
        }
        let mut services = Vec::new();
        for service in &file.services {
            services.push(Self::service(service, &lines)?);
        }
        let mut topology = Topology {
            name: file.name.value.clone(),
            entry: file.entry.value.clone(),
            slo,
            slo_percentile,
            services,
            demo: DemoDefaults { rate: 100.0, duration: Duration::from_secs(60), faults: Vec::new() },
        };
        topology.check_cycles(&file)?;
        // An external program reaches its callees through the sidecar's HTTP proxy port: they must speak HTTP.
        for (spec, file) in topology.services.iter().zip(&file.services) {
            if !matches!(spec.runtime, Runtime::External { .. }) {
                continue;
            }
            for callee in spec.steps.iter().flat_map(|step| &step.callees) {
                if topology.spec(callee).is_some_and(|callee| callee.protocol != Protocol::Http) {
                    return Err(format!(
                        "{}: the external service `{}` calls `{callee}`, which speaks grpc; it reaches its callees \
                         over HTTP/1.1 through the sidecar",
                        at(&file.name),
                        spec.name
                    ));
                }
            }
        }
        let entry_spec = topology.spec(&topology.entry).ok_or("the entry is missing")?;
        if entry_spec.protocol != Protocol::Http {
            return Err(format!("{}: the entry must speak http (the load generator sends HTTP)", at(&file.entry)));
        }
        let reachable = topology.reachable_from_entry();
        if let Some(service) = file.services.iter().find(|s| !reachable.contains(&s.name.value)) {
            return Err(format!(
                "{}: service `{}` is never called from the entry `{}`",
                at(&service.name),
                service.name.value,
                topology.entry
            ));
        }
        topology.assign_budgets(&file);
        if let Some(demo) = &file.demo {
            topology.demo = topology.demo_defaults(demo)?;
        }
        Ok(topology)
    }

    fn service(file: &ServiceFile, known: &BTreeMap<String, At>) -> Result<ServiceSpec, String> {
        let name = file.name.value.clone();
        let protocol = match file.protocol.value.as_str() {
            "http" => Protocol::Http,
            "grpc" => Protocol::Grpc,
            other => return Err(format!("{}: protocol `{other}` is not http or grpc", at(&file.protocol))),
        };
        let capacity = count(&file.capacity, "capacity", 1, MAX_CAPACITY)?;
        let pool = match &file.pool {
            Some(pool) => pool
                .value
                .parse::<PoolScope>()
                .map_err(|_| format!("{}: pool `{}` is not own or request", at(pool), pool.value))?,
            None => PoolScope::Own,
        };
        let cores = match &file.cores {
            Some(cores) => count(cores, "cores", 1, MAX_CORES as i64)?,
            None => 1,
        };
        let cpu = file.cpu.as_ref().map(|cpu| duration(cpu, "cpu")).transpose()?.unwrap_or_default();
        let service_time =
            file.service_time.as_ref().map(service_time).transpose()?.unwrap_or(ServiceTime::Constant(Duration::ZERO));
        let max_replicas = match &file.max_replicas {
            Some(max) => count(max, "max_replicas", 1, MAX_REPLICAS)?,
            None => 10,
        };
        let min_replicas = match &file.min_replicas {
            Some(min) => count(min, "min_replicas", 1, i64::from(max_replicas))?,
            None => 1,
        };
        let replicas = match &file.replicas {
            Some(replicas) => count(replicas, "replicas", i64::from(min_replicas), i64::from(max_replicas))?,
            None => min_replicas,
        };
        let budget = file.budget.as_ref().map(|budget| duration(budget, "budget")).transpose()?;
        if file.calls.len() > MAX_STEPS {
            return Err(format!("{}: {} calls is over the limit of {MAX_STEPS}", at(&file.name), file.calls.len()));
        }
        let mut steps = Vec::new();
        for step in &file.calls {
            let callees: Vec<&Spanned<String>> = match (&step.call, &step.parallel) {
                (Some(call), None) => vec![call],
                (None, Some(parallel)) => {
                    if parallel.value.is_empty() || parallel.value.len() > MAX_PARALLEL {
                        return Err(format!(
                            "{}: a parallel step needs 1 to {MAX_PARALLEL} callees, not {}",
                            at(parallel),
                            parallel.value.len()
                        ));
                    }
                    parallel.value.iter().collect()
                }
                (Some(call), Some(_)) => {
                    return Err(format!("{}: a step has either `call` or `parallel`, not both", at(call)));
                }
                (None, None) => {
                    let line = step.probability.as_ref().map_or_else(|| at(&file.name), at);
                    return Err(format!("{line}: a step of `{name}` needs `call` or `parallel`"));
                }
            };
            for callee in &callees {
                if !known.contains_key(&callee.value) {
                    return Err(format!(
                        "{}: `{name}` calls `{}`, which is not a service here",
                        at(callee),
                        callee.value
                    ));
                }
            }
            let probability = match &step.probability {
                Some(p) if !(p.value > 0.0 && p.value <= 1.0) => {
                    return Err(format!("{}: probability {} is not in (0, 1]", at(p), p.value));
                }
                Some(p) => p.value,
                None => 1.0,
            };
            steps.push(Step { callees: callees.iter().map(|c| c.value.clone()).collect(), probability });
        }
        let runtime = Self::runtime(file, protocol, &steps)?;
        Ok(ServiceSpec {
            name,
            protocol,
            capacity,
            pool,
            cores,
            cpu,
            service_time,
            replicas,
            min_replicas,
            max_replicas,
            budget: budget.unwrap_or_default(),
            steps,
            runtime,
        })
    }

    /// `runtime` and `command`: an external service is an HTTP program that calls each of its callees in turn.
    fn runtime(file: &ServiceFile, protocol: Protocol, steps: &[Step]) -> Result<Runtime, String> {
        let name = &file.name.value;
        let external = match &file.runtime {
            None => false,
            Some(runtime) => match runtime.value.as_str() {
                "modelled" => false,
                "external" => true,
                other => return Err(format!("{}: runtime `{other}` is not modelled or external", at(runtime))),
            },
        };
        let Some(command) = &file.command else {
            if external {
                return Err(format!("{}: the external service `{name}` needs a `command`", at(&file.name)));
            }
            return Ok(Runtime::Modelled);
        };
        if !external {
            return Err(format!("{}: `command` is for a service with `runtime: external`", at(command)));
        }
        let line = at(command);
        if command.value.is_empty() || command.value.len() > MAX_COMMAND_ARGS {
            return Err(format!("{line}: a command has 1 to {MAX_COMMAND_ARGS} words, not {}", command.value.len()));
        }
        if let Some(word) = command
            .value
            .iter()
            .find(|word| word.is_empty() || word.len() > MAX_COMMAND_ARG_BYTES || word.contains('\0'))
        {
            return Err(format!(
                "{line}: command word `{}` is empty, over {MAX_COMMAND_ARG_BYTES} bytes or holds a NUL",
                word.chars().take(40).collect::<String>()
            ));
        }
        if protocol != Protocol::Http {
            return Err(format!("{}: an external service speaks http here", at(&file.protocol)));
        }
        // Its program decides what it calls; the topology can only say whom, in order.
        if let Some(step) = steps.iter().find(|step| step.callees.len() > 1 || step.probability < 1.0) {
            return Err(format!(
                "{line}: `{name}` is external: its calls are made by its program, one callee after another, so a \
                 step cannot be parallel or have a probability ({})",
                step.callees.join(", ")
            ));
        }
        for (field, present) in [("cpu", file.cpu.is_some()), ("cores", file.cores.is_some())] {
            if present {
                return Err(format!("{line}: `{field}` does not apply to the external service `{name}`"));
            }
        }
        Ok(Runtime::External { command: command.value.clone() })
    }

    /// Calls must form a DAG: a cycle would make a request call itself forever.
    fn check_cycles(&self, file: &File) -> Result<(), String> {
        // Depth-first search; a callee on the current path closes a cycle, reported at that call's line.
        fn visit<'a>(
            topology: &'a Topology,
            file: &File,
            name: &'a str,
            path: &mut Vec<&'a str>,
            done: &mut BTreeSet<&'a str>,
        ) -> Result<(), String> {
            if done.contains(name) {
                return Ok(());
            }
            path.push(name);
            for callee in topology.callees(name) {
                let callee = topology.spec(&callee).map(|s| s.name.as_str()).unwrap_or_default();
                if path.contains(&callee) {
                    let line = call_line(file, name, callee).map_or_else(String::new, |line| format!("{line}: "));
                    let start = path.iter().position(|p| *p == callee).unwrap_or(0);
                    let cycle: Vec<&str> = path[start..].iter().copied().chain([callee]).collect();
                    return Err(format!("{line}calls form a cycle: {}", cycle.join(" -> ")));
                }
                visit(topology, file, callee, path, done)?;
            }
            path.pop();
            done.insert(name);
            Ok(())
        }
        let mut done = BTreeSet::new();
        for service in &self.services {
            visit(self, file, &service.name, &mut Vec::new(), &mut done)?;
        }
        Ok(())
    }

    fn reachable_from_entry(&self) -> BTreeSet<String> {
        let mut seen = BTreeSet::from([self.entry.clone()]);
        let mut queue = vec![self.entry.clone()];
        while let Some(name) = queue.pop() {
            for callee in self.callees(&name) {
                if seen.insert(callee.clone()) {
                    queue.push(callee);
                }
            }
        }
        seen
    }

    /// Expected latency of a service's subtree: its own mean work plus each step's (the slowest of a parallel
    /// step), weighted by the step's probability.
    fn expected_latency(&self, name: &str) -> Duration {
        let Some(spec) = self.spec(name) else { return Duration::ZERO };
        let own = spec.service_time.mean() + spec.cpu;
        spec.steps.iter().fold(own, |sum, step| {
            let slowest = step.callees.iter().map(|c| self.expected_latency(c)).max().unwrap_or_default();
            sum + slowest.mul_f64(step.probability)
        })
    }

    /// A service without a `budget` gets the SLO's share its expected latency has of the entry's.
    fn assign_budgets(&mut self, file: &File) {
        let entry_expected = self.expected_latency(&self.entry).as_secs_f64().max(1e-6);
        let budgets: Vec<Duration> = self
            .services
            .iter()
            .zip(&file.services)
            .map(|(spec, service_file)| {
                if service_file.budget.is_some() {
                    spec.budget
                } else if spec.name == self.entry {
                    self.slo
                } else {
                    let share = (self.expected_latency(&spec.name).as_secs_f64() / entry_expected).min(1.0);
                    self.slo.mul_f64(share).max(Duration::from_millis(1))
                }
            })
            .collect();
        for (spec, budget) in self.services.iter_mut().zip(budgets) {
            spec.budget = budget;
        }
    }

    fn demo_defaults(&self, demo: &DemoFile) -> Result<DemoDefaults, String> {
        let rate = match &demo.rate {
            Some(rate) if !(rate.value > 0.0 && rate.value <= 10_000.0) => {
                return Err(format!("{}: rate {} is not in (0, 10000]", at(rate), rate.value));
            }
            Some(rate) => rate.value,
            None => 100.0,
        };
        let duration = match &demo.duration {
            Some(text) => humantime::parse_duration(text.value.trim())
                .map_err(|e| format!("{}: duration `{}` is not a duration ({e})", at(text), text.value))?,
            None => Duration::from_secs(60),
        };
        let mut faults = Vec::new();
        for text in &demo.faults {
            let fault: Fault = text.value.parse().map_err(|e| format!("{}: {e}", at(text)))?;
            if self.spec(&fault.service).is_none() {
                return Err(format!("{}: fault on `{}`, which is not a service here", at(text), fault.service));
            }
            faults.push(fault);
        }
        Ok(DemoDefaults { rate, duration, faults })
    }

    pub fn spec(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Every service `name` calls.
    pub fn callees(&self, name: &str) -> BTreeSet<String> {
        self.spec(name)
            .map(|s| s.steps.iter().flat_map(|step| step.callees.iter().cloned()).collect())
            .unwrap_or_default()
    }

    /// Every service from which `target` can be reached.
    pub fn ancestors(&self, target: &str) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        loop {
            let before = found.len();
            for service in &self.services {
                let callees = self.callees(&service.name);
                if callees.contains(target) || callees.iter().any(|c| found.contains(c)) {
                    found.insert(service.name.clone());
                }
            }
            if found.len() == before {
                return found;
            }
        }
    }
}

/// The line of the call from `caller` to `callee`, for error messages.
fn call_line(file: &File, caller: &str, callee: &str) -> Option<At> {
    let service = file.services.iter().find(|s| s.name.value == caller)?;
    service.calls.iter().find_map(|step| {
        let mut names: Vec<&Spanned<String>> = step.call.iter().collect();
        if let Some(parallel) = &step.parallel {
            names.extend(parallel.value.iter());
        }
        names.into_iter().find(|name| name.value == callee).map(at)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
name: tiny
entry: web
slo: 100ms
services:
  - name: web
    protocol: http
    capacity: 8
    cpu: 1ms
    service_time: {distribution: exponential, mean: 4ms}
    calls:
      - call: db
      - parallel: [cache, db]
        probability: 0.5
  - name: db
    protocol: grpc
    capacity: 4
    service_time: {distribution: constant, value: 10ms}
  - name: cache
    protocol: http
    capacity: 4
demo:
  rate: 50
  faults: [db=capacity:2@10s]
";

    fn error(text: &str) -> String {
        match Topology::parse(text, "t.yaml") {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn a_good_file_reads_with_derived_budgets() {
        let topology = Topology::parse(GOOD, "t.yaml").unwrap();
        assert_eq!(topology.entry, "web");
        let web = topology.spec("web").unwrap();
        assert_eq!(web.steps[1], Step { callees: vec!["cache".into(), "db".into()], probability: 0.5 });
        assert_eq!(web.budget, Duration::from_millis(100));
        // web expects 5 + 10 + 0.5 × 10 = 20 ms, db 10 ms: half the SLO.
        assert_eq!(topology.spec("db").unwrap().budget, Duration::from_millis(50));
        assert_eq!(topology.demo.faults.len(), 1);
        assert_eq!(topology.ancestors("db"), BTreeSet::from(["web".to_string()]));
        assert_eq!(web.pool, PoolScope::Own);
        let held = GOOD.replace("    capacity: 8\n", "    capacity: 8\n    pool: request\n");
        assert_eq!(Topology::parse(&held, "t.yaml").unwrap().spec("web").unwrap().pool, PoolScope::Request);
    }

    #[test]
    fn bad_files_name_the_line() {
        let cases = [
            (
                GOOD.replace("      - call: db\n", "      - call: dbx\n"),
                "line 11",
                "`web` calls `dbx`, which is not a service",
            ),
            (
                GOOD.replace("    capacity: 4\n    service_time", "    capacity: -4\n    service_time"),
                "line 16",
                "capacity is -4",
            ),
            (GOOD.replace("    cpu: 1ms\n", "    cpu: 1ms\n    colour: blue\n"), "line 9", "unknown field `colour`"),
            (
                GOOD.replace("value: 10ms}\n", "value: 10ms}\n    calls: [{call: web}]\n"),
                "line 18",
                "cycle: web -> db -> web",
            ),
            (GOOD.replace("probability: 0.5", "probability: 1.5"), "line 13", "probability 1.5"),
            (GOOD.replace("  - name: cache", "  - name: db"), "line 18", "already defined on line 14"),
            (GOOD.replace("mean: 4ms", "mean: soon"), "line 9", "not a duration"),
            (GOOD.replace("    capacity: 8\n", "    capacity: 8\n    pool: forever\n"), "line 8", "pool `forever`"),
            (GOOD.replace("entry: web", "entry: api"), "line 2", "entry `api`"),
            (GOOD.replace("[db=capacity:2@10s]", "[db=melt:2@10s]"), "line 23", "melt"),
            (GOOD.replace("      - parallel: [cache, db]\n        probability: 0.5\n", ""), "line 16", "never called"),
        ];
        for (text, line, what) in cases {
            assert_ne!(text, GOOD, "the case for {what} changed nothing");
            let message = error(&text);
            assert!(message.starts_with("t.yaml: "), "{message}");
            assert!(message.contains(line), "{message} does not name {line}");
            assert!(message.contains(what), "{message} does not say {what}");
        }
    }

    #[test]
    fn an_external_service_runs_its_command_and_is_checked() {
        let external = GOOD.replace(
            "  - name: cache\n    protocol: http\n    capacity: 4\n",
            "  - name: cache\n    protocol: http\n    capacity: 4\n    runtime: external\n    command: [python3, svc.py]\n",
        );
        let topology = Topology::parse(&external, "t.yaml").unwrap();
        assert_eq!(
            topology.spec("cache").unwrap().runtime,
            Runtime::External { command: vec!["python3".into(), "svc.py".into()] }
        );
        assert_eq!(topology.spec("web").unwrap().runtime, Runtime::Modelled);
        let cases = [
            (external.replace("runtime: external", "runtime: docker"), "line 21", "runtime `docker`"),
            (external.replace("    command: [python3, svc.py]\n", ""), "line 18", "needs a `command`"),
            (external.replace("    runtime: external\n", ""), "line 21", "`command` is for a service with"),
            (external.replace("[python3, svc.py]", "[]"), "line 22", "1 to 64 words"),
            (external.replace("[python3, svc.py]", "[python3, '']"), "line 22", "is empty"),
            (
                external.replace("  - name: cache\n    protocol: http", "  - name: cache\n    protocol: grpc"),
                "line 19",
                "speaks http",
            ),
            (
                external.replace("    capacity: 4\n    runtime", "    capacity: 4\n    cpu: 1ms\n    runtime"),
                "line 23",
                "`cpu` does not apply",
            ),
        ];
        for (text, line, what) in cases {
            assert_ne!(text, external, "the case for {what} changed nothing");
            let message = error(&text);
            assert!(message.contains(line), "{message} does not name {line}");
            assert!(message.contains(what), "{message} does not say {what}");
        }
        // Its calls are its program's: one callee after another, always.
        let calling = external.replace(
            "    capacity: 4\n    runtime: external\n    command: [python3, svc.py]\n",
            "    capacity: 4\n    runtime: external\n    command: [python3, svc.py]\n    calls:\n      - parallel: [db]\n        probability: 0.5\n",
        );
        assert!(error(&calling).contains("cannot be parallel or have a probability"), "{}", error(&calling));
    }

    #[test]
    fn oversized_files_are_refused_before_parsing() {
        let text = format!("# {}\n{GOOD}", "x".repeat(MAX_FILE_BYTES));
        assert!(error(&text).contains("over the limit"));
    }
}
