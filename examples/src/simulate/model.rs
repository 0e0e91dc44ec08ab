//! What each replica's tracer would have aggregated over one window, from a queueing model instead of requests:
//! the numbers a simulated agent decides on, written into the tracer's own [`WindowStats`] with its own
//! `record_request` / `record_call`.
//!
//! Per service and window: the arrival rate (its callers' rates times their call probabilities), a queue for a
//! worker per replica (Sakasegawa's M/M/c approximation below saturation; above it a backlog that grows by the
//! excess and is served first-come first-served, so a request's wait is the backlog over the service rate, up to
//! the callers' 5 s timeout) and the same for the cores. Then sampled requests, deepest services first, as the timing headers would carry them:
//! each request's own wait, a sampled response of each callee it calls (plus the link's time), the critical
//! path of its parallel calls, and its largest wait — the callee's, the link's, or its own. Samples are recorded
//! with weights that add up to the window's completions per replica, each at least 1 and every caller given at
//! least one sample (so that a service learns every caller as a neighbour): when completions collapse below the
//! samples, the window over-counts them (a known limit of the model).

use rand::{Rng, rngs::StdRng};
use rand_distr::{Distribution, Exp1};
use rootscale_tracer::{
    aggregate::{CallSample, RequestSample, WindowStats},
    measure::headers::WaitPointRef,
};

use crate::simulate::graph::{Graph, Pool};

/// Sampled requests per service per window (more when it has more callers).
pub const SAMPLES: usize = 16;
/// A link's own time when nothing is wrong with it (milliseconds).
const LINK_MS: f64 = 0.3;
/// The longest a request waits in a queue before its caller gives up (a timeout upstream): bounds a backlog, so a
/// fault's queue drains within a few windows of its end, as timeouts make it in real systems.
const MAX_QUEUED_MS: f64 = 5_000.0;
/// Edges a window keeps per direction (the tracer's default cap).
const EDGE_CAP: usize = rootscale_tracer::DEFAULT_EDGE_CAP;

/// What a fault does to the model.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Workers per replica multiplied by this (capacity cut), per service.
    pub workers: Vec<f64>,
    /// CPU per request multiplied by this, per service.
    pub cpu: Vec<f64>,
    /// Own non-CPU time per request multiplied by this (a slow disk or dependency), per service.
    pub slow: Vec<f64>,
    /// Extra milliseconds on the link (caller, callee).
    pub links: Vec<(usize, usize, f64)>,
}

impl Faults {
    pub fn none(size: usize) -> Self {
        Self { workers: vec![1.0; size], cpu: vec![1.0; size], slow: vec![1.0; size], links: Vec::new() }
    }

    fn link_ms(&self, caller: usize, callee: usize) -> f64 {
        LINK_MS
            + self
                .links
                .iter()
                .filter(|(from, to, _)| *from == caller && *to == callee)
                .map(|(_, _, ms)| ms)
                .sum::<f64>()
    }
}

/// One sampled response of a service: what its timing header would say.
#[derive(Clone, Copy, Debug)]
struct Response {
    total_ms: f64,
    /// The largest wait: at `(service, None)` its own local wait, at `(caller, Some(callee))` a link.
    largest: (usize, Option<usize>),
    largest_ms: f64,
}

/// The model's state between windows: each service's backlogs.
pub struct Model {
    /// Requests waiting for a worker beyond what the pool serves, whole service.
    worker_backlog: Vec<f64>,
    /// CPU work (requests) waiting beyond what the cores serve, whole service.
    cpu_backlog: Vec<f64>,
}

/// One window of every service, per replica.
pub struct WindowOutput {
    pub stats: Vec<WindowStats>,
}

impl Model {
    pub fn new(size: usize) -> Self {
        Self { worker_backlog: vec![0.0; size], cpu_backlog: vec![0.0; size] }
    }

    /// The window `window_id` (`window_ms` long) of every service of `graph` under `faults`; agents are named by
    /// `agent`.
    pub fn window(
        &mut self,
        graph: &Graph,
        faults: &Faults,
        window_id: u64,
        window_ms: u64,
        agent: &dyn Fn(usize) -> String,
        rng: &mut StdRng,
    ) -> WindowOutput {
        let size = graph.services.len();
        let seconds = window_ms as f64 / 1000.0;
        let mut responses: Vec<Vec<Response>> = vec![Vec::new(); size];
        let mut stats: Vec<WindowStats> = (0..size).map(|_| WindowStats::new(window_id)).collect();
        let names: Vec<&str> = graph.services.iter().map(|s| s.name.as_str()).collect();
        let agents: Vec<String> = (0..size).map(agent).collect();
        // Deepest first: a service's callees have their responses before it samples its own.
        for index in (0..size).rev() {
            let service = &graph.services[index];
            let rate = graph.rates[index];
            let replicas = f64::from(service.replicas);
            let cpu_ms = service.cpu_ms * faults.cpu[index];
            let own_ms = cpu_ms + (service.service_ms - service.cpu_ms) * faults.slow[index];
            // A thread-per-request worker is held through the calls too: the mean downstream time counts.
            let mean_downstream =
                if service.pool == Pool::Request { mean_downstream(graph, index, &responses, faults) } else { 0.0 };
            let hold_ms = own_ms + mean_downstream;
            let workers = (f64::from(service.workers) * faults.workers[index]).max(1.0);
            let (worker_wait_ms, served) =
                queue(&mut self.worker_backlog[index], rate / replicas, hold_ms, workers, seconds);
            let (cpu_wait_ms, _) = queue(&mut self.cpu_backlog[index], rate / replicas, cpu_ms, service.cores, seconds);
            let completions = served * replicas * seconds;
            stats[index].arrivals = (rate * seconds).round() as u64 / u64::from(service.replicas).max(1);
            // Who sends the samples: each caller at least one, in proportion to its share; the rest from outside.
            let mut senders: Vec<(Option<usize>, f64)> = graph.callers[index]
                .iter()
                .map(|&caller| {
                    let calls: f64 = graph.services[caller]
                        .calls
                        .iter()
                        .filter(|call| call.callee == index)
                        .map(|call| call.probability)
                        .sum();
                    (Some(caller), graph.rates[caller] * calls / rate.max(f64::MIN_POSITIVE))
                })
                .collect();
            if service.external_rate > 0.0 {
                senders.push((None, service.external_rate / rate.max(f64::MIN_POSITIVE)));
            }
            let per_replica = completions / replicas;
            for (sender, share) in senders {
                let count = ((SAMPLES as f64 * share).round() as usize).max(1);
                let weight = ((per_replica * share / count as f64).round() as u64).max(1);
                for _ in 0..count {
                    let sampled = sample_request(
                        graph,
                        index,
                        (worker_wait_ms, cpu_wait_ms, own_ms, cpu_ms),
                        &responses,
                        faults,
                        rng,
                        |call| stats_call(&mut stats[index], &names, &agents, weight, call),
                    );
                    let sample = RequestSample {
                        caller: sender.map(|caller| (names[caller], Some(agents[caller].as_str()))),
                        total_us: us(sampled.response.total_ms),
                        busy_us: us(cpu_ms),
                        cpu_wait_us: us(sampled.cpu_wait_ms),
                        downstream_us: us(sampled.downstream_ms),
                        local_wait_us: us(sampled.local_ms),
                        pool_wait_us: us(sampled.pool_ms),
                        error: false,
                        cancelled: false,
                        weight,
                    };
                    stats[index].record_request(&sample, EDGE_CAP);
                    responses[index].push(sampled.response);
                }
            }
        }
        WindowOutput { stats }
    }
}

/// The mean time a request of `index` spends in its calls (from the callees' responses this window).
fn mean_downstream(graph: &Graph, index: usize, responses: &[Vec<Response>], faults: &Faults) -> f64 {
    let service = &graph.services[index];
    let mean = |callee: usize| {
        let samples = &responses[callee];
        let total: f64 = samples.iter().map(|r| r.total_ms).sum();
        total / samples.len().max(1) as f64 + faults.link_ms(index, callee)
    };
    let sequential: f64 = service.calls.iter().filter(|c| !c.parallel).map(|c| c.probability * mean(c.callee)).sum();
    let parallel = service.calls.iter().filter(|c| c.parallel).map(|c| mean(c.callee)).fold(0.0, f64::max);
    sequential + parallel
}

/// One replica's queue for `servers` (workers or cores) with `rate` arrivals per second, each holding one for
/// `hold_ms`; `backlog` (whole-window count, carried between windows) grows past saturation. Returns the mean wait
/// (milliseconds) and the completions per second.
fn queue(backlog: &mut f64, rate: f64, hold_ms: f64, servers: f64, seconds: f64) -> (f64, f64) {
    let service_rate = servers * 1000.0 / hold_ms.max(1e-6);
    let load = rate / service_rate;
    // The backlog grows by what arrives beyond what is served, and drains by the spare; callers give up on a
    // request queued longer than MAX_QUEUED_MS, so it holds at most that much work.
    *backlog = (*backlog + (rate - service_rate) * seconds).clamp(0.0, service_rate * MAX_QUEUED_MS / 1000.0);
    let steady = if load < 1.0 {
        // Sakasegawa: Wq ≈ S · ρ^(√(2(c+1)) − 1) / (c (1 − ρ)).
        hold_ms * load.powf((2.0 * (servers + 1.0)).sqrt() - 1.0) / (servers * (1.0 - load).max(0.02))
    } else {
        hold_ms * 50.0 / servers
    };
    let wait = (steady.min(hold_ms * 50.0 / servers) + *backlog / service_rate * 1000.0).min(MAX_QUEUED_MS);
    let served = if *backlog > 0.0 { service_rate } else { rate.min(service_rate) };
    (wait, served)
}

/// One sampled request, with the parts the server layer records.
struct Sampled {
    response: Response,
    local_ms: f64,
    pool_ms: f64,
    cpu_wait_ms: f64,
    downstream_ms: f64,
}

/// One call as the client layer records it.
struct CallRecord {
    callee: usize,
    client_ms: f64,
    remote: Response,
    net_ms: f64,
    critical: bool,
}

fn sample_request(
    graph: &Graph,
    index: usize,
    (worker_wait_ms, cpu_wait_mean, own_ms, cpu_ms): (f64, f64, f64, f64),
    responses: &[Vec<Response>],
    faults: &Faults,
    rng: &mut StdRng,
    mut record_call: impl FnMut(&CallRecord),
) -> Sampled {
    let service = &graph.services[index];
    let exp = |rng: &mut StdRng| -> f64 { Exp1.sample(rng) };
    let pool_ms = worker_wait_ms * exp(rng);
    let cpu_wait_ms = cpu_wait_mean * exp(rng);
    let work_ms = (own_ms - cpu_ms).max(0.0) * (0.5 + rng.random::<f64>());
    // As the server layer measures it: everything but its own CPU time and its calls, so waiting for a core too.
    let local_ms = pool_ms + work_ms + cpu_wait_ms;
    let mut downstream_ms = 0.0;
    // The largest wait so far: this service's own.
    let mut largest = ((index, None), local_ms);
    let mut parallel: Vec<CallRecord> = Vec::new();
    for call in &service.calls {
        if call.probability < 1.0 && rng.random::<f64>() >= call.probability {
            continue;
        }
        let samples = &responses[call.callee];
        let Some(remote) = samples.get(rng.random_range(0..samples.len().max(1))).copied() else { continue };
        let net_ms = faults.link_ms(index, call.callee) * (0.8 + 0.4 * rng.random::<f64>());
        let record =
            CallRecord { callee: call.callee, client_ms: remote.total_ms + net_ms, remote, net_ms, critical: true };
        if call.parallel {
            parallel.push(record);
        } else {
            downstream_ms += record.client_ms;
            largest = larger(largest, candidate(index, &record));
            record_call(&record);
        }
    }
    if let Some(last) = parallel.iter().map(|c| c.client_ms).reduce(f64::max) {
        downstream_ms += last;
        let mut critical_taken = false;
        for mut record in parallel {
            record.critical = !critical_taken && record.client_ms >= last;
            critical_taken |= record.critical;
            if record.critical {
                largest = larger(largest, candidate(index, &record));
            }
            record_call(&record);
        }
    }
    let total_ms = local_ms + cpu_ms + downstream_ms;
    Sampled {
        response: Response { total_ms, largest: largest.0, largest_ms: largest.1 },
        local_ms,
        pool_ms,
        cpu_wait_ms,
        downstream_ms,
    }
}

/// What a call adds to its request's largest wait: the link or the callee's subtree, whichever waited longer.
fn candidate(caller: usize, call: &CallRecord) -> ((usize, Option<usize>), f64) {
    if call.net_ms > call.remote.largest_ms {
        ((caller, Some(call.callee)), call.net_ms)
    } else {
        (call.remote.largest, call.remote.largest_ms)
    }
}

fn larger(a: ((usize, Option<usize>), f64), b: ((usize, Option<usize>), f64)) -> ((usize, Option<usize>), f64) {
    if b.1 > a.1 { b } else { a }
}

fn stats_call(stats: &mut WindowStats, names: &[&str], agents: &[String], weight: u64, call: &CallRecord) {
    let point = match call.remote.largest {
        (service, None) => WaitPointRef::Local(names[service]),
        (from, Some(to)) => WaitPointRef::Net { from: names[from], to: names[to] },
    };
    stats.record_call(
        &CallSample {
            callee: names[call.callee],
            callee_agent: Some(agents[call.callee].as_str()),
            client_total_us: us(call.client_ms),
            remote_total_us: Some(us(call.remote.total_ms)),
            net_wait_us: Some(us(call.net_ms)),
            remote_wait: (point, us(call.remote.largest_ms)),
            critical: call.critical,
            error: false,
            untied: false,
            weight,
        },
        EDGE_CAP,
    );
}

fn us(ms: f64) -> u64 {
    (ms.max(0.0) * 1000.0).round() as u64
}
