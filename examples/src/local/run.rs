//! One run: start the topology, send the load, inject the faults on time, let the policy decide every sync
//! period, and record every second — the entry's latency, each service's replicas, rate, latency, waits and
//! verdict — then drain and stop. The result is a [`Timeline`] with a [`Summary`].

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use rootscale_proto::v1::WaitKind;
use rootscale_tracer::{
    SampleRate,
    aggregate::histogram::Histogram,
    decide::{AggregationMode, Verdict},
    identity::{KeyRing, MeshKeys},
};
use serde::Serialize;

use crate::local::{
    Error,
    cluster::{Cluster, ClusterConfig},
    load::Load,
    policy::{Action, Controller, Policy},
    push::Pushes,
    replica::CpuModel,
    scenario::{Fault, FaultKind, RateSchedule},
    topology::Topology,
};

/// HPA's default scale-down stabilisation, which every policy of a run keeps unless told otherwise.
pub const HPA_SCALE_DOWN_STABILIZATION: Duration = Duration::from_secs(300);

/// How a run is set up.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub topology: Topology,
    pub policy: Policy,
    pub rate: RateSchedule,
    pub faults: Vec<Fault>,
    pub duration: Duration,
    pub seed: u64,
    /// The agents' window.
    pub window: Duration,
    /// How often the policy decides (HPA's sync period, shortened for a one-minute demo).
    pub sync: Duration,
    pub mode: AggregationMode,
    /// HPA-cpu's target utilisation.
    pub cpu_target: f64,
    /// Every policy's scale-down stabilisation (HPA's default, 5 minutes, unless a test needs less).
    pub scale_down_stabilization: Duration,
    pub cpu_model: CpuModel,
    /// The run's mesh key, made anew for each run: replicas prove membership with it, and the policy asks their
    /// agents as the operator does.
    pub mesh_keys: Arc<KeyRing>,
    /// Which requests the replicas measure (`--sample 1/16`).
    pub sample: SampleRate,
}

impl RunConfig {
    /// How the run's replicas are started.
    pub fn cluster(&self) -> ClusterConfig {
        ClusterConfig {
            window: self.window,
            mode: self.mode,
            seed: self.seed,
            cpu_model: self.cpu_model,
            mesh_keys: self.mesh_keys.clone(),
            sample: self.sample,
        }
    }

    /// A run of `topology` with its demo defaults, and a mesh key of its own.
    pub fn new(topology: Topology, policy: Policy) -> Result<Self, Error> {
        let demo = topology.demo.clone();
        let mesh_keys = MeshKeys::generate().map_err(|error| Error::Start(error.to_string()))?;
        Ok(Self {
            rate: RateSchedule::constant(demo.rate),
            faults: demo.faults.into_iter().take(1).collect(),
            duration: demo.duration,
            topology,
            policy,
            seed: 1,
            window: Duration::from_secs(1),
            sync: Duration::from_secs(2),
            mode: AggregationMode::Max,
            cpu_target: 0.6,
            scale_down_stabilization: HPA_SCALE_DOWN_STABILIZATION,
            cpu_model: CpuModel::Virtual,
            mesh_keys: Arc::new(KeyRing::fixed(mesh_keys)),
            sample: SampleRate::ALL,
        })
    }

    /// Faults must name services of the topology and be able to act on them.
    pub fn check(&self) -> Result<(), Error> {
        for fault in &self.faults {
            let spec = self.topology.spec(&fault.service).ok_or_else(|| {
                Error::Scenario(format!("fault `{fault}`: no service `{}` in {}", fault.service, self.topology.name))
            })?;
            if matches!(spec.runtime, super::topology::Runtime::External { .. }) {
                return Err(Error::Scenario(format!(
                    "fault `{fault}`: `{}` is external; faults act on modelled services only",
                    fault.service
                )));
            }
            if matches!(fault.kind, FaultKind::Cpu(_)) && spec.cpu.is_zero() {
                return Err(Error::Scenario(format!("fault `{fault}`: `{}` uses no CPU to multiply", fault.service)));
            }
            if fault.service == self.topology.entry && matches!(fault.kind, FaultKind::Link(_)) {
                return Err(Error::Scenario(format!(
                    "fault `{fault}`: the link into the entry comes from the load generator, which has no agent"
                )));
            }
            if fault.at >= self.duration {
                return Err(Error::Scenario(format!("fault `{fault}` is after the end of the run")));
            }
            if fault.until.is_some_and(|until| until > self.duration) {
                return Err(Error::Scenario(format!("fault `{fault}` ends after the end of the run")));
            }
        }
        if self.duration < Duration::from_secs(5) || self.duration > super::scenario::MAX_TIME {
            return Err(Error::Scenario(format!("duration {:?} is not between 5s and 1h", self.duration)));
        }
        if self.sync < self.window {
            return Err(Error::Scenario("the sync period must be at least one window".into()));
        }
        Ok(())
    }
}

/// One service in one second.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceRow {
    pub name: String,
    pub replicas: u32,
    /// Requests per second over the agents' last window, all replicas.
    pub rps: f64,
    /// Its own latency at the SLO percentile (the slowest replica), and its budget.
    pub latency_ms: f64,
    pub budget_ms: f64,
    /// Waits at the SLO percentile (the largest over replicas and callees): its own, on links to callees, and in
    /// callees' subtrees.
    pub local_wait_ms: f64,
    pub net_wait_ms: f64,
    pub remote_wait_ms: f64,
    /// What most replicas say (ties go to the more pressing verdict).
    pub verdict: String,
    /// Where the verdict points: callees delegated to, the slow link, or the kind of local wait.
    pub detail: String,
    pub delegated_to: Vec<String>,
    /// Some replica estimated its own wait for the window (a sidecar's service without trace context).
    pub own_wait_estimated: bool,
    /// Calls per second to each callee over the agents' last window, all replicas.
    pub calls: BTreeMap<String, f64>,
}

/// The entry, as the load generator saw it, in one second.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EntryRow {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub latency_ms: Option<f64>,
}

/// Everything in one second.
#[derive(Clone, Debug, Serialize)]
pub struct Tick {
    /// Seconds since the load started.
    pub t: u64,
    pub rate: f64,
    /// Requests that ended during the second before `t`.
    pub entry: EntryRow,
    pub services: Vec<ServiceRow>,
}

/// When a fault was found.
#[derive(Clone, Debug, Serialize)]
pub struct Detection {
    pub fault: String,
    pub at_s: f64,
    /// The first second the service was root cause (for a link: its callers said network), if ever.
    pub detected_at_s: Option<u64>,
}

/// A run in numbers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    /// Seconds in which the entry's latency at the SLO percentile (requests sent that second; failures count as
    /// the timeout) was over the SLO.
    pub slo_violation_seconds: u64,
    /// Replicas summed over the run's seconds, all services.
    pub replica_seconds: u64,
    pub scaling_actions: usize,
    /// Actions on services no capacity or CPU fault was injected into.
    pub wrong_scalings: usize,
    /// The entry's latency at the SLO percentile: before the first fault, the worst second after it, and over
    /// the last 10 seconds.
    pub latency_before_ms: Option<f64>,
    pub latency_worst_ms: Option<f64>,
    pub latency_after_ms: Option<f64>,
    /// Seconds from the first fault (or change of load) until the entry's latency at the SLO percentile stayed under the SLO for
    /// [`RECOVERED_FOR`] seconds in a row (counted from the first of them; 0 if the SLO never broke); `None` if it
    /// never did.
    pub recovered_after_s: Option<u64>,
    pub final_replicas: BTreeMap<String, u32>,
    /// Scalings the policy asked for that this machine could not carry out, and the first one's error: a run
    /// with any measured the machine, not the policy.
    pub failed_scalings: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failed_scaling: Option<String>,
}

/// Seconds in a row under the SLO that count as recovered.
pub const RECOVERED_FOR: usize = 10;

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Timeline {
    pub topology: String,
    pub policy: String,
    pub seed: u64,
    pub slo_ms: f64,
    pub slo_percentile: f64,
    pub duration_s: u64,
    pub faults: Vec<String>,
    pub detections: Vec<Detection>,
    pub actions: Vec<ActionRecord>,
    pub ticks: Vec<Tick>,
    pub summary: Summary,
}

/// A scaling action, for the timeline.
#[derive(Clone, Debug, Serialize)]
pub struct ActionRecord {
    pub at_s: f64,
    pub service: String,
    pub from: u32,
    pub to: u32,
    pub reason: String,
    /// Made on an agent's push: seconds from the end of the pushed window to the request; absent for a sync's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pushed_after_s: Option<f64>,
}

impl From<&Action> for ActionRecord {
    fn from(action: &Action) -> Self {
        Self {
            at_s: action.at,
            service: action.service.clone(),
            from: action.from,
            to: action.to,
            reason: action.reason.clone(),
            pushed_after_s: action.pushed_after,
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn percentile(histogram: Option<&rootscale_proto::v1::Histogram>, at: f64) -> u64 {
    histogram.and_then(|h| Histogram::from_proto(h).ok()).and_then(|h| h.percentile_us(at)).unwrap_or(0)
}

/// Orders verdicts by how much they ask for attention, for ties.
fn pressing(verdict: Verdict) -> u8 {
    match verdict {
        Verdict::RootCause => 6,
        Verdict::Network => 5,
        Verdict::Saturated => 4,
        Verdict::Delegated => 3,
        Verdict::InsufficientData => 2,
        Verdict::Idle => 1,
        Verdict::Healthy => 0,
    }
}

/// One service's row, from its replicas' agents.
pub fn service_row(cluster: &Cluster, name: &str, window: Duration) -> ServiceRow {
    let topology = &cluster.topology;
    let at = topology.slo_percentile;
    let mut row = ServiceRow {
        name: name.to_string(),
        replicas: cluster.replicas(name),
        rps: 0.0,
        latency_ms: 0.0,
        budget_ms: topology.spec(name).map_or(0.0, |s| s.budget.as_secs_f64() * 1e3),
        local_wait_ms: 0.0,
        net_wait_ms: 0.0,
        remote_wait_ms: 0.0,
        verdict: String::new(),
        detail: String::new(),
        delegated_to: Vec::new(),
        own_wait_estimated: false,
        calls: BTreeMap::new(),
    };
    let seconds = window.as_secs_f64().max(0.001);
    let mut votes: BTreeMap<(u8, &'static str), (usize, String, Vec<String>)> = BTreeMap::new();
    let mut requests = 0;
    for replica in cluster.replica_info(name) {
        let snapshot = replica.view.snapshot();
        if let Some(window) = &snapshot.last_window {
            requests += window.requests;
            row.latency_ms = row.latency_ms.max(ms(percentile(window.total.as_ref(), at)));
            row.local_wait_ms = row.local_wait_ms.max(ms(percentile(window.local_wait.as_ref(), at)));
            for edge in &window.outbound {
                row.net_wait_ms = row.net_wait_ms.max(ms(percentile(edge.net_wait.as_ref(), at)));
                row.remote_wait_ms = row.remote_wait_ms.max(ms(percentile(edge.remote_wait.as_ref(), at)));
                *row.calls.entry(edge.callee.clone()).or_default() += edge.calls as f64 / seconds;
            }
        }
        let Some(decision) = snapshot.decision else { continue };
        let Some(verdict) = Verdict::from_proto(decision.verdict) else { continue };
        row.own_wait_estimated |=
            decision.evidence.as_ref().is_some_and(|evidence| evidence.local_wait_estimate.is_some());
        let detail = match verdict {
            Verdict::Delegated => format!("-> {}", decision.delegated_to.join(",")),
            Verdict::Network => decision
                .bottleneck
                .as_ref()
                .filter(|point| point.kind() == WaitKind::Net)
                .map(|point| format!("link {}>{}", point.from_service, point.service))
                .unwrap_or_default(),
            Verdict::RootCause => decision.kind.clone(),
            _ => String::new(),
        };
        let vote =
            votes.entry((pressing(verdict), verdict.as_str())).or_insert((0, detail, decision.delegated_to.clone()));
        vote.0 += 1;
    }
    row.rps = requests as f64 / seconds;
    // Most votes; among equals, the more pressing verdict (the map is in ascending order of it, and
    // `max_by_key` keeps the last of equal maxima).
    if let Some(((_, verdict), (_, detail, delegated_to))) =
        votes.iter().max_by_key(|(_, (count, _, _))| *count).map(|(k, v)| (*k, v.clone()))
    {
        row.verdict = verdict.to_string();
        row.detail = detail;
        row.delegated_to = delegated_to;
    }
    row
}

/// Whether `fault` shows in this second's rows: its service is root cause, or, for a link, a caller says the
/// link into it is slow.
fn detected(fault: &Fault, rows: &[ServiceRow]) -> bool {
    match fault.kind {
        FaultKind::Link(_) => {
            rows.iter().any(|row| row.verdict == "network" && row.detail.ends_with(&format!(">{}", fault.service)))
        }
        _ => rows.iter().any(|row| row.name == fault.service && row.verdict == "root-cause"),
    }
}

/// Runs `config`, calling `on_tick` every second with the new tick, the actions taken in it and the faults
/// found so far.
pub fn run(config: &RunConfig, mut on_tick: impl FnMut(&Tick, &[Action], &[Detection])) -> Result<Timeline, Error> {
    config.check()?;
    let harness = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::Start(e.to_string()))?;
    let cluster = Cluster::start(config.topology.clone(), &config.cluster())?;
    let outcome = harness.block_on(drive(config, cluster.clone(), &mut on_tick));
    cluster.stop();
    outcome
}

async fn drive(
    config: &RunConfig,
    cluster: Arc<Cluster>,
    on_tick: &mut impl FnMut(&Tick, &[Action], &[Detection]),
) -> Result<Timeline, Error> {
    let topology = &config.topology;
    let mut controller =
        Controller::new(config.policy, cluster.clone(), config.cpu_target, config.scale_down_stabilization)?;
    // Seconds of the run fall in the middle of the agents' windows: a sync reads a window closed half a window ago,
    // its reports and delegations settled, and anything scheduled at a whole second happens inside one window.
    tokio::time::sleep(until_mid_window(config.window)).await;
    let load =
        Load::start(&tokio::runtime::Handle::current(), cluster.entry_registry()?, config.rate.clone(), config.seed);
    let started = Instant::now();
    let mut faults: Vec<Fault> = config.faults.clone();
    faults.sort_by_key(|fault| fault.at);
    let mut injected = 0;
    let mut healed = vec![false; faults.len()];
    let mut detections: Vec<Detection> = faults
        .iter()
        .map(|fault| Detection { fault: fault.to_string(), at_s: fault.at.as_secs_f64(), detected_at_s: None })
        .collect();
    let mut ticks = Vec::new();
    let mut actions: Vec<Action> = Vec::new();
    let sync_every = config.sync.as_secs().max(1);
    let seconds = config.duration.as_secs();
    let mut pushes = Pushes::new(controller.agents().clone());
    let pushing = config.policy == Policy::Rootscale;
    // A pushed decision waits this long for the delegations of its window to land on the other agents.
    let settle = config.window / 10;
    let mut pushed_actions = Vec::new();
    for t in 1..=seconds {
        if pushing {
            pushes.follow(&cluster);
        }
        let tick_at = started + Duration::from_secs(t);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(tick_at.into()) => break,
                Some(pushed) = pushes.next(), if pushing => {
                    tokio::time::sleep(settle).await;
                    let (service, window_id) = (pushed.service, pushed.window_id);
                    pushed_actions.extend(controller.pushed(started.elapsed(), &service, window_id, config.window).await);
                }
            }
        }
        let elapsed = started.elapsed();
        while injected < faults.len() && faults[injected].at <= elapsed {
            cluster.inject(&faults[injected])?;
            tracing::info!(fault = %faults[injected], "injected");
            injected += 1;
        }
        for (fault, healed) in faults.iter().zip(healed.iter_mut()).take(injected) {
            if !*healed && fault.until.is_some_and(|until| until <= elapsed) {
                cluster.heal(fault)?;
                tracing::info!(%fault, "ended");
                *healed = true;
            }
        }
        let mut new_actions = std::mem::take(&mut pushed_actions);
        if t % sync_every == 0 {
            new_actions.extend(controller.sync(elapsed).await);
        }
        let services: Vec<ServiceRow> =
            topology.services.iter().map(|spec| service_row(&cluster, &spec.name, config.window)).collect();
        for (fault, detection) in faults.iter().zip(detections.iter_mut()).take(injected) {
            if detection.detected_at_s.is_none() && detected(fault, &services) {
                detection.detected_at_s = Some(t);
            }
        }
        let ended = load.ended_in(t as usize - 1);
        let tick = Tick {
            t,
            rate: config.rate.rate_at(elapsed),
            entry: EntryRow {
                sent: ended.sent,
                ok: ended.ok,
                failed: ended.failed,
                latency_ms: ended.percentile(topology.slo_percentile).map(|d| d.as_secs_f64() * 1e3),
            },
            services,
        };
        on_tick(&tick, &new_actions, &detections);
        ticks.push(tick);
        actions.extend(new_actions);
    }
    // Drain: stop sending, wait for every request still out.
    let load = tokio::task::spawn_blocking(move || {
        load.stop();
        load
    })
    .await
    .map_err(|e| Error::Start(e.to_string()))?;
    let summary = summarize(config, &load.by_start(), load.totals(), &ticks, &actions, &cluster);
    Ok(Timeline {
        topology: topology.name.clone(),
        policy: config.policy.to_string(),
        seed: config.seed,
        slo_ms: topology.slo.as_secs_f64() * 1e3,
        slo_percentile: topology.slo_percentile,
        duration_s: seconds,
        faults: faults.iter().map(Fault::to_string).collect(),
        detections,
        actions: actions.iter().map(ActionRecord::from).collect(),
        ticks,
        summary,
    })
}

/// How long until the middle of the next window (windows are aligned to Unix time, as the agents' are).
pub(crate) fn until_mid_window(window: Duration) -> Duration {
    let window_ms = window.as_millis().max(1);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    let phase = now_ms % window_ms;
    let wait = (window_ms / 2 + window_ms - phase) % window_ms;
    Duration::from_millis(u64::try_from(wait).unwrap_or(0))
}

fn summarize(
    config: &RunConfig,
    by_start: &[crate::local::load::Second],
    (sent, ok, failed): (u64, u64, u64),
    ticks: &[Tick],
    actions: &[Action],
    cluster: &Cluster,
) -> Summary {
    let topology = &config.topology;
    let seconds = config.duration.as_secs() as usize;
    let at = topology.slo_percentile;
    let (failed_scalings, first_failed_scaling) = cluster.failed_scalings();
    let latency = |range: std::ops::Range<usize>| -> Option<f64> {
        let mut merged = crate::local::load::Second::default();
        for second in by_start.get(range.start.min(by_start.len())..range.end.min(by_start.len()))? {
            merged.latency.merge(&second.latency);
            merged.failed += second.failed;
        }
        merged.percentile(at).map(|d| d.as_secs_f64() * 1e3)
    };
    // What the run is about: its first fault, else its first change of load (a surge).
    let first_fault = config
        .faults
        .iter()
        .map(|f| f.at.as_secs() as usize)
        .min()
        .or_else(|| config.rate.steps.get(1).map(|(at, _)| at.as_secs() as usize));
    let scaled_for: Vec<&str> =
        config.faults.iter().filter(|f| !matches!(f.kind, FaultKind::Link(_))).map(|f| f.service.as_str()).collect();
    Summary {
        sent,
        ok,
        failed,
        slo_violation_seconds: by_start
            .iter()
            .take(seconds)
            .filter(|second| second.sent > 0 && second.percentile(at).is_some_and(|p| p > topology.slo))
            .count() as u64,
        replica_seconds: ticks
            .iter()
            .map(|tick| tick.services.iter().map(|s| u64::from(s.replicas)).sum::<u64>())
            .sum(),
        scaling_actions: actions.len(),
        wrong_scalings: actions.iter().filter(|a| !scaled_for.contains(&a.service.as_str())).count(),
        latency_before_ms: first_fault.and_then(|at| latency(at.saturating_sub(10).max(2)..at)),
        latency_worst_ms: first_fault.and_then(|at| {
            by_start
                .iter()
                .take(seconds)
                .skip(at)
                .filter_map(|second| second.percentile(topology.slo_percentile))
                .max()
                .map(|d| d.as_secs_f64() * 1e3)
        }),
        latency_after_ms: latency(seconds.saturating_sub(10)..seconds),
        recovered_after_s: first_fault.and_then(|at| {
            let within = |second: &crate::local::load::Second| {
                second.sent == 0 || second.percentile(topology.slo_percentile).is_none_or(|p| p <= topology.slo)
            };
            let after: Vec<bool> = by_start.iter().take(seconds).skip(at).map(within).collect();
            // The fault counts from its first violation: a second under the SLO before it bit is not recovery.
            let Some(broke) = after.iter().position(|ok| !ok) else { return Some(0) };
            (broke..after.len().saturating_sub(RECOVERED_FOR - 1))
                .find(|start| after[*start..*start + RECOVERED_FOR].iter().all(|ok| *ok))
                .map(|start| start as u64)
        }),
        final_replicas: topology.services.iter().map(|s| (s.name.clone(), cluster.replicas(&s.name))).collect(),
        failed_scalings,
        first_failed_scaling,
    }
}
