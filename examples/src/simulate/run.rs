//! The discrete-event run: one [`Decider`] per service (standing for its replicas, which see the same window in
//! the model), windows that close at each service's own skewed time, and reports delivered after a random delay or
//! lost. Every report goes through the wire form and [`validate`] before the receiver takes it, as over gRPC.

use std::{
    cmp::Reverse,
    collections::{BTreeSet, BinaryHeap},
    sync::Arc,
    time::{Duration, Instant},
};

use prost::Message as _;
use rand::{Rng, SeedableRng, rngs::StdRng};
use rootscale_proto::v1 as proto;
use rootscale_tracer::{
    ClosedWindow,
    aggregate::WindowStats,
    decide::{
        AggregationMode, Capacity, PolicyConfig, PoolScope, Slo, Verdict,
        decider::{Decider, DeciderConfig},
        inputs::{DecisionSettings, SettingsUpdate},
    },
    exchange::{outbox::Outbox, report::validate},
};

use crate::simulate::{
    graph::{Graph, Pool},
    model::{Faults, Model},
};

/// One simulated run's settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub services: usize,
    pub seed: u64,
    pub windows: u64,
    pub window_ms: u64,
    pub mode: AggregationMode,
    /// Share of reports lost on the way.
    pub loss: f64,
    /// Largest delivery delay of a report (milliseconds); each takes 1 ms to this.
    pub max_delay_ms: u64,
    /// Largest clock skew between two agents (milliseconds): each closes its windows this late at most.
    pub max_skew_ms: u64,
}

impl SimConfig {
    pub fn new(services: usize, seed: u64) -> Self {
        Self {
            services,
            seed,
            windows: 60,
            window_ms: 1000,
            mode: AggregationMode::Max,
            loss: 0.0,
            max_delay_ms: 50,
            max_skew_ms: 100,
        }
    }
}

/// The kinds of fault injected, in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Workers per replica cut to a quarter of what the load needs.
    Capacity,
    /// CPU per request raised until the cores are 150 % loaded.
    Cpu,
    /// 300 ms more on one link.
    Link,
    /// A callee of a thread-per-request service 10× slower in its own (non-CPU) work: its callers' pools fill.
    PoolCascade,
    /// Two capacity cuts at once.
    TwoAtOnce,
}

pub const FAULT_KINDS: [FaultKind; 5] =
    [FaultKind::Capacity, FaultKind::Cpu, FaultKind::Link, FaultKind::PoolCascade, FaultKind::TwoAtOnce];

/// Windows before the first fault: the SLOs are set from the healthy latency first.
const WARM_UP: u64 = 4;
/// Windows a fault lasts, and the healthy windows after it.
const FAULT_WINDOWS: u64 = 6;
const RECOVERY_WINDOWS: u64 = 6;

/// One fault's outcome.
#[derive(Clone, Debug)]
pub struct FaultOutcome {
    pub kind: FaultKind,
    /// The services at fault (for a link: the caller, whose verdict is `network`).
    pub truth: Vec<String>,
    /// Windows from the fault's start to the first window in which every culprit that broke an entry's SLO was
    /// named (1: the first).
    pub detected_in: Option<u64>,
    /// Root-cause (or, for a link, network) verdicts during the fault, right and wrong.
    pub right: u64,
    pub wrong: u64,
    /// The first wrong verdicts: service, window and reason.
    pub wrong_examples: Vec<String>,
    /// Whether the latency of some entry above a culprit passed its SLO during the fault (otherwise nothing is
    /// asked of anyone).
    pub violated: bool,
    /// The largest p95 over its SLO of an entry above a culprit during the fault (above 1: violated).
    pub peak_slo_ratio: f64,
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct SimOutcome {
    pub faults: Vec<FaultOutcome>,
    /// Per agent per window: reports sent and their bytes.
    pub reports_per_agent_window: Vec<f64>,
    pub bytes_per_agent_window: Vec<f64>,
    /// Per agent per window: time spent in the decision code (window, reports received, validation).
    pub cpu_per_agent_window: Vec<Duration>,
    pub reports_sent: u64,
    pub reports_lost: u64,
    pub reports_refused: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Spans per second a central collector would ingest for the same traffic: one server span per request a
    /// service serves and one client span per call.
    pub spans_per_second: f64,
    /// Services in the graph.
    pub services: usize,
}

/// A service's verdict in one window: the link it names (network), and the reason (root cause, network).
type Seen = (Verdict, Option<(String, String)>, Option<String>);

enum Event {
    Close { service: usize },
    Deliver { to: usize, report: Box<proto::NeighborReport> },
}

/// Events by time (microseconds), then by their slot (the order they were pushed in), so equal times keep their
/// order.
struct Queue {
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    events: Vec<Option<Event>>,
}

impl Queue {
    fn push(&mut self, at_us: u64, event: Event) {
        let slot = self.events.len();
        self.events.push(Some(event));
        self.heap.push(Reverse((at_us, slot)));
    }

    fn pop(&mut self) -> Option<(u64, Event)> {
        let Reverse((at, slot)) = self.heap.pop()?;
        self.events[slot].take().map(|event| (at, event))
    }
}

/// A loopback agent address per service: 127.x.y.z, never dialled.
pub fn agent_addr(index: usize) -> String {
    let n = index + 1;
    format!("127.{}.{}.{}:9797", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
}

/// Runs `config`: the graph, its faults in turn, every agent's decisions.
pub fn run(config: &SimConfig) -> SimOutcome {
    let started = Instant::now();
    let graph = Graph::generate(config.services, config.seed);
    let size = graph.services.len();
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x5eed);
    let policy = PolicyConfig { mode: config.mode, ..PolicyConfig::default() };
    let mut deciders: Vec<Decider> = graph
        .services
        .iter()
        .enumerate()
        .map(|(index, service)| {
            let capacity = Capacity {
                cores: service.cores,
                concurrency: Some(f64::from(service.workers)),
                pool_scope: match service.pool {
                    Pool::Own => PoolScope::Own,
                    Pool::Request => PoolScope::Request,
                },
            };
            let config = DeciderConfig {
                service: service.name.clone(),
                advertise: agent_addr(index),
                window_ms: config.window_ms,
                policy: policy.clone(),
                capacity,
                max_neighbors: rootscale_tracer::agent::DEFAULT_MAX_NEIGHBORS,
            };
            let settings =
                DecisionSettings { current_replicas: service.replicas, ..DecisionSettings::configured(None, &policy) };
            Decider::new(config, settings)
        })
        .collect();
    let skew_us: Vec<u64> = (0..size).map(|_| rng.random_range(0..=config.max_skew_ms * 1000)).collect();
    let mandatory = mandatory_reach(&graph);
    let schedule = fault_schedule(&graph, &mandatory, config.windows, &mut rng);
    let mut model = Model::new(size);
    let mut outcome = SimOutcome::default();
    let window_us = config.window_ms * 1000;
    let entries: Vec<usize> = (0..size).filter(|&i| graph.services[i].external_rate > 0.0).collect();
    let mut slo_us: Vec<Option<u64>> = vec![None; size];
    let mut reports = vec![(0_u64, 0_u64); size];
    let mut cpu = vec![Duration::ZERO; size];
    let mut verdicts: Vec<Vec<Seen>> = Vec::new();
    // Per window, per service: an entry's p95 over its SLO (0 for the others).
    let mut slo_ratio: Vec<Vec<f64>> = Vec::new();
    for window_id in 1..=config.windows {
        let faults =
            schedule.iter().find(|f| f.covers(window_id)).map_or_else(|| Faults::none(size), |f| f.faults.clone());
        let output = model.window(&graph, &faults, window_id, config.window_ms, &agent_addr, &mut rng);
        if window_id == WARM_UP {
            // The entries' SLOs: twice the healthy p95, and at least 100 ms above it.
            for &entry in &entries {
                let p95 = output.stats[entry].total.percentile_us(95.0).unwrap_or(0);
                let slo = Slo { latency_us: (2 * p95).max(p95 + 100_000), percentile: 95.0 };
                slo_us[entry] = Some(slo.latency_us);
                deciders[entry].set_settings(&SettingsUpdate { slo: Some(slo), ..SettingsUpdate::default() });
            }
        }
        let mut ratios = vec![0.0; size];
        for &entry in &entries {
            let p95 = output.stats[entry].total.percentile_us(95.0).unwrap_or(0);
            ratios[entry] = slo_us[entry].map_or(0.0, |slo| p95 as f64 / slo.max(1) as f64);
        }
        slo_ratio.push(ratios);
        let mut windows: Vec<Option<WindowStats>> = output.stats.into_iter().map(Some).collect();
        let mut queue = Queue { heap: BinaryHeap::new(), events: Vec::new() };
        // A window closes just after its end, at each agent's own skew.
        let close_at = (window_id + 1) * window_us;
        for (service, skew) in skew_us.iter().enumerate() {
            queue.push(close_at + skew, Event::Close { service });
        }
        reports.fill((0, 0));
        cpu.fill(Duration::ZERO);
        while let Some((at, event)) = queue.pop() {
            match event {
                Event::Close { service, .. } => {
                    let Some(stats) = windows[service].take() else { continue };
                    let window = Arc::new(ClosedWindow {
                        service: graph.services[service].name.as_str().into(),
                        window_ms: config.window_ms,
                        stats,
                    });
                    let timer = Instant::now();
                    let (outbox, _) = deciders[service].on_window(window);
                    cpu[service] += timer.elapsed();
                    send(&mut queue, &mut rng, config, &graph, service, at, outbox, &mut reports, &mut outcome);
                }
                Event::Deliver { to, report } => {
                    let timer = Instant::now();
                    let now = at.saturating_sub(skew_us[to]) / window_us;
                    let taken = match validate(&report, config.window_ms) {
                        Ok(valid) => {
                            let result = deciders[to].on_report(valid, now);
                            Some(result)
                        }
                        Err(_) => None,
                    };
                    cpu[to] += timer.elapsed();
                    match taken {
                        Some(result) => {
                            if !result.taken {
                                outcome.reports_refused += 1;
                            }
                            send(
                                &mut queue,
                                &mut rng,
                                config,
                                &graph,
                                to,
                                at,
                                result.outbox,
                                &mut reports,
                                &mut outcome,
                            );
                        }
                        None => outcome.reports_refused += 1,
                    }
                }
            }
        }
        for service in 0..size {
            outcome.reports_per_agent_window.push(reports[service].0 as f64);
            outcome.bytes_per_agent_window.push(reports[service].1 as f64);
            outcome.cpu_per_agent_window.push(cpu[service]);
        }
        verdicts.push(
            deciders
                .iter()
                .map(|decider| {
                    let decision = decider.decision();
                    let link = match (&decision.verdict, &decision.bottleneck) {
                        (Verdict::Network, Some(rootscale_tracer::measure::record::WaitPoint::Net { from, to })) => {
                            Some((from.to_string(), to.to_string()))
                        }
                        _ => None,
                    };
                    let reason = matches!(decision.verdict, Verdict::RootCause | Verdict::Network)
                        .then(|| decision.reason.clone());
                    (decision.verdict, link, reason)
                })
                .collect(),
        );
    }
    for fault in &schedule {
        outcome.faults.push(fault.outcome(&graph, &verdicts, &slo_ratio));
    }
    let external: f64 = graph.services.iter().map(|s| s.external_rate).sum();
    let served: f64 = graph.rates.iter().sum();
    outcome.spans_per_second = 2.0 * served - external;
    outcome.services = size;
    outcome.elapsed = started.elapsed();
    outcome
}

#[allow(clippy::too_many_arguments)]
fn send(
    queue: &mut Queue,
    rng: &mut StdRng,
    config: &SimConfig,
    graph: &Graph,
    from: usize,
    at: u64,
    outbox: Outbox,
    reports: &mut [(u64, u64)],
    outcome: &mut SimOutcome,
) {
    for outgoing in outbox {
        reports[from].0 += 1;
        reports[from].1 += outgoing.report.encoded_len() as u64;
        outcome.reports_sent += 1;
        if rng.random::<f64>() < config.loss {
            outcome.reports_lost += 1;
            continue;
        }
        let Some(to) = service_index(graph, &outgoing.service) else { continue };
        let delay_us = rng.random_range(1000..=config.max_delay_ms.max(1) * 1000);
        queue.push(at + delay_us, Event::Deliver { to, report: Box::new(outgoing.report) });
    }
}

fn service_index(graph: &Graph, name: &str) -> Option<usize> {
    name.strip_prefix("svc-").and_then(|n| n.parse::<usize>().ok()).filter(|&i| i < graph.services.len())
}

/// Services every request of some entry reaches (through calls made always).
fn mandatory_reach(graph: &Graph) -> Vec<bool> {
    let size = graph.services.len();
    let mut reached = vec![false; size];
    for index in 0..size {
        if graph.services[index].external_rate > 0.0 {
            reached[index] = true;
        }
        if reached[index] {
            for call in &graph.services[index].calls {
                if call.probability >= 1.0 {
                    reached[call.callee] = true;
                }
            }
        }
    }
    reached
}

/// One scheduled fault.
struct Scheduled {
    kind: FaultKind,
    from: u64,
    until: u64,
    faults: Faults,
    /// The culprits (services; for a link, the caller).
    truth: Vec<usize>,
    /// For a link: (caller, callee).
    link: Option<(usize, usize)>,
}

impl Scheduled {
    fn covers(&self, window_id: u64) -> bool {
        (self.from..self.until).contains(&window_id)
    }

    fn outcome(&self, graph: &Graph, verdicts: &[Vec<Seen>], slo_ratio: &[Vec<f64>]) -> FaultOutcome {
        let names: Vec<String> = self.truth.iter().map(|&i| graph.services[i].name.clone()).collect();
        let link = self.link.map(|(from, to)| (graph.services[from].name.clone(), graph.services[to].name.clone()));
        let truth: BTreeSet<usize> = self.truth.iter().copied().collect();
        let windows = || (self.from..self.until).filter_map(|w| slo_ratio.get(w as usize - 1));
        // The culprits whose faults broke the SLO of an entry above them (or their own): only those are asked to
        // be named; another is at most saturated, and scaled for that.
        let mut peak_slo_ratio: f64 = 0.0;
        let mut hurt: Vec<usize> = Vec::new();
        for &culprit in &self.truth {
            let mut above = graph.ancestors(culprit);
            above.push(culprit);
            let peak = windows().flat_map(|ratios| above.iter().map(|&service| ratios[service])).fold(0.0, f64::max);
            peak_slo_ratio = peak_slo_ratio.max(peak);
            if peak > 1.0 {
                hurt.push(culprit);
            }
        }
        let (mut right, mut wrong, mut detected_in) = (0, 0, None);
        let mut wrong_examples = Vec::new();
        for window_id in self.from..self.until {
            let Some(window) = verdicts.get(window_id as usize - 1) else { break };
            let mut named: BTreeSet<usize> = BTreeSet::new();
            for (index, (verdict, on_link, reason)) in window.iter().enumerate() {
                let says = match (&link, verdict) {
                    (Some(_), Verdict::Network) => Some(on_link.as_ref() == link.as_ref()),
                    (_, Verdict::RootCause) => Some(truth.contains(&index) && link.is_none()),
                    (None, Verdict::Network) => Some(false),
                    _ => None,
                };
                match says {
                    Some(true) => {
                        right += 1;
                        named.insert(index);
                    }
                    Some(false) => {
                        wrong += 1;
                        if wrong_examples.len() < 3 {
                            wrong_examples.push(format!(
                                "{} in window {}: {}",
                                graph.services[index].name,
                                window_id - self.from + 1,
                                reason.as_deref().unwrap_or_default()
                            ));
                        }
                    }
                    None => {}
                }
            }
            if detected_in.is_none() && !hurt.is_empty() && hurt.iter().all(|t| named.contains(t)) {
                detected_in = Some(window_id - self.from + 1);
            }
        }
        FaultOutcome {
            kind: self.kind,
            truth: names,
            detected_in,
            right,
            wrong,
            wrong_examples,
            violated: !hurt.is_empty(),
            peak_slo_ratio,
        }
    }
}

fn fault_schedule(graph: &Graph, mandatory: &[bool], windows: u64, rng: &mut StdRng) -> Vec<Scheduled> {
    let size = graph.services.len();
    let candidates: Vec<usize> = (0..size).filter(|&i| mandatory[i]).collect();
    let mut schedule = Vec::new();
    let mut from = WARM_UP + 1;
    let mut turn = 0;
    while from + FAULT_WINDOWS <= windows && !candidates.is_empty() {
        let kind = FAULT_KINDS[turn % FAULT_KINDS.len()];
        turn += 1;
        let mut faults = Faults::none(size);
        let pick = |rng: &mut StdRng| candidates[rng.random_range(0..candidates.len())];
        let (truth, link) = match kind {
            FaultKind::Capacity => {
                let target = pick(rng);
                faults.workers[target] = capacity_cut(graph, target);
                (vec![target], None)
            }
            FaultKind::TwoAtOnce => {
                let first = pick(rng);
                let mut second = pick(rng);
                for _ in 0..16 {
                    if second != first
                        && !graph.ancestors(second).contains(&first)
                        && !graph.ancestors(first).contains(&second)
                    {
                        break;
                    }
                    second = pick(rng);
                }
                faults.workers[first] = capacity_cut(graph, first);
                faults.workers[second] = capacity_cut(graph, second);
                (vec![first, second], None)
            }
            FaultKind::Cpu => {
                let target = pick(rng);
                faults.cpu[target] = (1.5 / cpu_load(graph, target).max(0.01)).max(1.0);
                (vec![target], None)
            }
            FaultKind::Link => {
                let links: Vec<(usize, usize)> = candidates
                    .iter()
                    .flat_map(|&caller| {
                        graph.services[caller]
                            .calls
                            .iter()
                            .filter(|c| c.probability >= 1.0)
                            .map(move |c| (caller, c.callee))
                    })
                    .collect();
                let Some(&(caller, callee)) = links.get(rng.random_range(0..links.len().max(1))) else {
                    from += FAULT_WINDOWS + RECOVERY_WINDOWS;
                    continue;
                };
                faults.links.push((caller, callee, 300.0));
                (vec![caller], Some((caller, callee)))
            }
            FaultKind::PoolCascade => {
                // A callee (called always) of a thread-per-request service on a mandatory path.
                let callers: Vec<usize> =
                    candidates.iter().copied().filter(|&i| graph.services[i].pool == Pool::Request).collect();
                let targets: Vec<usize> = callers
                    .iter()
                    .flat_map(|&caller| {
                        graph.services[caller].calls.iter().filter(|c| c.probability >= 1.0).map(|c| c.callee)
                    })
                    .collect();
                let Some(&target) = targets.get(rng.random_range(0..targets.len().max(1))) else {
                    from += FAULT_WINDOWS + RECOVERY_WINDOWS;
                    continue;
                };
                faults.slow[target] = 10.0;
                (vec![target], None)
            }
        };
        schedule.push(Scheduled { kind, from, until: from + FAULT_WINDOWS, faults, truth, link });
        from += FAULT_WINDOWS + RECOVERY_WINDOWS;
    }
    schedule
}

/// The factor that leaves `target` a quarter of the workers its load needs.
fn capacity_cut(graph: &Graph, target: usize) -> f64 {
    let service = &graph.services[target];
    // Own work only: for a thread-per-request service, whose workers are also held through its calls, the cut is
    // deeper than a quarter (a known simplification).
    let busy = graph.rates[target] / f64::from(service.replicas) * service.service_ms / 1000.0;
    (busy / 4.0 / f64::from(service.workers)).clamp(1e-3, 1.0)
}

/// A replica's CPU utilisation before any fault.
fn cpu_load(graph: &Graph, target: usize) -> f64 {
    let service = &graph.services[target];
    graph.rates[target] / f64::from(service.replicas) * service.cpu_ms / 1000.0 / service.cores
}
