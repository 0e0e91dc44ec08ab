//! How many replicas this replica's load calls for (docs/DESIGN.md §1.5).
//!
//! - Utilisation law: CPU demand = arrival rate × busy time per request, against the cores this replica has
//!   (cgroup v2 `cpu.max`, else the runtime's workers).
//! - Little's law, for pool-bound services that declare their per-replica concurrency: requests in the service's
//!   hands on average (queued for a worker or holding one) against that concurrency — its own time in an async
//!   service, the whole request where a worker is held across calls ([`PoolScope::Request`]). When the pool is
//!   full — that many in hand, or requests waiting longer for a worker than they then hold it — the occupancy says
//!   nothing about demand, so the arrival rate over the completion rate (the pool's throughput) is used instead.
//! - Either way demand is what arrives plus what is already queued for this service's own resources — the mean
//!   queue for a worker and for a core over the window (Little's law on `pool_wait` and `cpu_wait`), drained
//!   within [`DRAIN_WITHIN`] — so the first step is not short of the queue the fault built up. Requests waiting on
//!   callees are not this service's backlog and are not counted.
//!
//! The larger wins. Each replica answers for the whole Deployment, as if every replica carried its load; the
//! operator combines the answers.

use crate::{aggregate::WindowStats, decide::policy::Verdict};

/// The most a full pool's arrivals-over-completions may say about demand in one window.
const MAX_POOL_RATIO: f64 = 10.0;
/// The backlog at a window's close is to be drained within this: the operator's resync period, the longest a
/// queue waits for the next step.
pub const DRAIN_WITHIN: f64 = 15.0;

/// How long a request holds a worker of the service's pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PoolScope {
    /// For the service's own work only: an async service, where waiting on a callee holds nothing.
    #[default]
    Own,
    /// For the whole request, calls to callees included: a thread-per-request service (a servlet container's
    /// pool, gunicorn's sync workers, a blocking pool). A slow callee then fills this service's pool.
    Request,
}

impl PoolScope {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolScope::Own => "own",
            PoolScope::Request => "request",
        }
    }
}

impl std::str::FromStr for PoolScope {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "own" => Ok(Self::Own),
            "request" => Ok(Self::Request),
            other => Err(format!("unknown pool scope {other:?}: use own or request")),
        }
    }
}

/// What one replica has.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Capacity {
    /// CPU cores available to the replica.
    pub cores: f64,
    /// Requests one replica serves at once (its worker or connection pool), if declared.
    pub concurrency: Option<f64>,
    /// How long a request holds one of those workers.
    pub pool_scope: PoolScope,
}

impl Capacity {
    /// Cores from cgroup v2 `cpu.max` (quota / period) where present, else the runtime's worker threads (or the
    /// machine's parallelism outside a runtime).
    pub fn detect(concurrency: Option<f64>, pool_scope: PoolScope) -> Self {
        let from_cgroup = std::fs::read_to_string("/sys/fs/cgroup/cpu.max").ok().and_then(|text| parse_cpu_max(&text));
        let cores = from_cgroup.unwrap_or_else(|| {
            tokio::runtime::Handle::try_current()
                .map(|handle| handle.metrics().num_workers() as f64)
                .unwrap_or_else(|_| std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64))
        });
        Self { cores: cores.max(0.01), concurrency, pool_scope }
    }
}

/// Parses cgroup v2 `cpu.max` ("max 100000" is unlimited, "200000 100000" is 2 cores).
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    let period: f64 = fields.next()?.parse().ok()?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    (quota > 0.0).then(|| quota / period)
}

/// A replica's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Recommendation {
    pub desired_replicas: u32,
    pub cpu_demand_cores: f64,
    pub cpu_capacity_cores: f64,
    pub mean_in_flight: f64,
    pub concurrency_per_replica: f64,
    /// This replica's utilisation (the larger of CPU and pool), 0 when unknown.
    pub utilization: f64,
    /// The utilisation over the target: HPA's usage ratio, what the operator combines.
    pub usage_ratio: f64,
    pub reason: String,
}

impl Recommendation {
    pub fn to_proto(&self) -> rootscale_proto::v1::Recommendation {
        rootscale_proto::v1::Recommendation {
            desired_replicas: self.desired_replicas,
            cpu_demand_cores: self.cpu_demand_cores,
            cpu_capacity_cores: self.cpu_capacity_cores,
            mean_in_flight: self.mean_in_flight,
            concurrency_per_replica: self.concurrency_per_replica,
            reason: self.reason.clone(),
            usage_ratio: self.usage_ratio,
        }
    }
}

/// One replica's load over a window, by the two laws.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Utilization {
    /// CPU demand over the cores the replica has.
    pub cpu: f64,
    /// Requests in its own hands over its declared concurrency (0 when none is declared).
    pub pool: f64,
    pub cpu_demand_cores: f64,
    /// Requests in the service's hands on average: its own time (queueing included), or (a
    /// [`PoolScope::Request`] pool) the whole request.
    pub mean_in_flight: f64,
    /// Requests queued for a worker or a core, on average over the window.
    pub backlog: f64,
}

impl Utilization {
    /// The larger of the two.
    pub fn max(&self) -> f64 {
        self.cpu.max(self.pool)
    }
}

/// The utilisation of one replica over a window, by the two laws.
pub fn utilization(stats: &WindowStats, window_ms: u64, capacity: Capacity) -> Utilization {
    utilization_with(stats, window_ms, capacity, 1.0)
}

/// The same, for a root cause whose callers held back demand it never saw: `unserved_ratio` is their arrivals over
/// completions (1 when none was held back), so at least that many times its completions were wanted.
pub fn utilization_with(stats: &WindowStats, window_ms: u64, capacity: Capacity, unserved_ratio: f64) -> Utilization {
    let seconds = (window_ms as f64 / 1000.0).max(0.001);
    let queued_us = stats.pool_wait.sum_us().saturating_add(stats.cpu_wait.sum_us());
    let backlog = queued_us as f64 / 1e6 / seconds;
    let held_back = stats.requests as f64 * unserved_ratio.clamp(1.0, MAX_POOL_RATIO);
    // What must be served: what arrives (or was held back upstream), and the queue drained within the drain period.
    let arrival_rate = (stats.arrivals.max(stats.requests) as f64).max(held_back) / seconds + backlog / DRAIN_WITHIN;
    let completion_rate = stats.requests as f64 / seconds;
    let cpu_demand = arrival_rate * stats.busy.mean_us() / 1e6;
    let cpu_utilization = cpu_demand / capacity.cores;
    let held_us = match capacity.pool_scope {
        // Time waiting on callees holds nothing of this service's (in an async service): leave it out.
        // Calls that could not be tied to their requests are left out the same way.
        PoolScope::Own => {
            stats.total.sum_us().saturating_sub(stats.downstream.sum_us()).saturating_sub(stats.untied_us)
        }
        // A worker is held through the calls: the whole request counts, as the queue for a worker does in an
        // async service's own time.
        PoolScope::Request => stats.total.sum_us(),
    };
    let mean_in_flight = held_us as f64 / 1e6 / seconds;
    // Requests that wait longer for a worker than they then hold it: the pool is full, whatever size was declared
    // (a pool shrunk by a fault or a misconfiguration).
    let pool_wait_us = stats.pool_wait.sum_us();
    let queueing = pool_wait_us > 0 && pool_wait_us >= held_us.saturating_sub(pool_wait_us);
    let pool_utilization = match capacity.concurrency {
        Some(concurrency) if concurrency > 0.0 => {
            if (mean_in_flight >= 0.95 * concurrency || queueing) && completion_rate > 0.0 {
                // Full: throughput is the pool's capacity; arrivals beyond it (and the queue) are unserved demand.
                // Capped, so one burst window cannot ask for a hundredfold.
                (arrival_rate / completion_rate).min(MAX_POOL_RATIO)
            } else {
                mean_in_flight / concurrency
            }
        }
        _ => 0.0,
    };
    Utilization { cpu: cpu_utilization, pool: pool_utilization, cpu_demand_cores: cpu_demand, mean_in_flight, backlog }
}

/// Desired replicas for the whole Deployment, from this replica's load over a window. Only a root cause, a
/// saturated or an idle service moves away from `current`; a root cause or saturated service never asks for
/// fewer, an idle one never for more.
pub fn recommend(
    verdict: Verdict,
    load: &Utilization,
    current_replicas: u32,
    target_utilization: f64,
    capacity: Capacity,
) -> Recommendation {
    let (cpu_utilization, pool_utilization) = (load.cpu, load.pool);
    let (cpu_demand, mean_in_flight) = (load.cpu_demand_cores, load.mean_in_flight);
    let utilization = load.max();
    let current = current_replicas.max(1);
    let target = if target_utilization > 0.0 && target_utilization.is_finite() { target_utilization } else { 0.7 };
    let wanted = |load: f64| -> u32 {
        let replicas = (f64::from(current) * load / target).ceil();
        if replicas.is_finite() { replicas.clamp(1.0, 10_000.0) as u32 } else { current }
    };
    let (by_cpu, by_pool) = (wanted(cpu_utilization), wanted(pool_utilization));
    let (desired, law) =
        if by_pool > by_cpu { (by_pool, "Little's law (pool)") } else { (by_cpu, "utilisation law (CPU)") };
    let desired = match verdict {
        Verdict::RootCause | Verdict::Saturated => desired.max(current),
        Verdict::Idle => desired.min(current),
        _ => current,
    };
    let reason = if desired == current {
        format!("{} replicas: utilisation {:.0}% against a {:.0}% target", current, utilization * 100.0, target * 100.0)
    } else {
        format!(
            "{desired} replicas by {law}: CPU {:.0}%, pool {:.0}% of {current} replica(s) against a {:.0}% target",
            cpu_utilization * 100.0,
            pool_utilization * 100.0,
            target * 100.0
        )
    };
    Recommendation {
        desired_replicas: desired,
        cpu_demand_cores: cpu_demand,
        cpu_capacity_cores: capacity.cores,
        mean_in_flight,
        concurrency_per_replica: capacity.concurrency.unwrap_or(0.0),
        utilization,
        usage_ratio: utilization / target,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::histogram::Histogram;

    fn stats(arrivals: u64, requests: u64, busy_us: u64, total_us: u64) -> WindowStats {
        let mut stats = WindowStats::new(1);
        stats.arrivals = arrivals;
        stats.requests = requests;
        let (mut busy, mut total) = (Histogram::new(), Histogram::new());
        for _ in 0..requests {
            busy.record(busy_us);
            total.record(total_us);
        }
        (stats.busy, stats.total) = (busy, total);
        stats
    }

    fn advise(
        verdict: Verdict,
        window: &WindowStats,
        window_ms: u64,
        current: u32,
        target: f64,
        capacity: Capacity,
    ) -> Recommendation {
        recommend(verdict, &utilization(window, window_ms, capacity), current, target, capacity)
    }

    #[test]
    fn cpu_demand_by_the_utilisation_law() {
        // 500 req/s × 4 ms of CPU = 2 cores, on a 1-core replica at a 100% target: 2 replicas.
        let window = stats(2500, 2500, 4000, 5000);
        let capacity = Capacity { cores: 1.0, concurrency: None, pool_scope: PoolScope::Own };
        let recommendation = advise(Verdict::RootCause, &window, 5000, 1, 1.0, capacity);
        assert_eq!(recommendation.desired_replicas, 2);
        assert!((recommendation.cpu_demand_cores - 2.0).abs() < 0.1);
    }

    #[test]
    fn a_full_pool_at_three_times_its_capacity_asks_for_three_times_the_replicas() {
        // Pool of 2, 10 ms each: 200 req/s. 600 req/s arrive, 200 complete, the backlog grows.
        let window = stats(3000, 1000, 100, 900_000);
        let capacity = Capacity { cores: 1.0, concurrency: Some(2.0), pool_scope: PoolScope::Own };
        assert_eq!(advise(Verdict::RootCause, &window, 5000, 1, 1.0, capacity).desired_replicas, 3);
        assert_eq!(advise(Verdict::RootCause, &window, 5000, 2, 1.0, capacity).desired_replicas, 6);
    }

    #[test]
    fn the_queue_a_fault_built_up_is_demand_too() {
        // As above, and the requests completed this window queued 1.5 s for a worker on average: 300 queued on
        // average, to drain within the drain period on top of the 600 req/s arriving.
        let mut window = stats(3000, 1000, 100, 900_000);
        for _ in 0..1000 {
            window.pool_wait.record(1_500_000);
        }
        let capacity = Capacity { cores: 1.0, concurrency: Some(2.0), pool_scope: PoolScope::Own };
        let load = utilization(&window, 5000, capacity);
        assert!((load.backlog - 300.0).abs() < 300.0 * 0.04, "{}", load.backlog);
        let expected = (600.0 + load.backlog / DRAIN_WITHIN) / 200.0;
        assert!((load.pool - expected).abs() < 1e-9, "{} against {expected}", load.pool);
        assert_eq!(advise(Verdict::RootCause, &window, 5000, 1, 1.0, capacity).desired_replicas, 4);
    }

    #[test]
    fn a_worker_held_for_the_whole_request_counts_its_calls() {
        // 100 req/s for 5 s, each 10 ms of its own and 30 ms in a callee, 5 ms queued for a worker first.
        let mut window = stats(500, 500, 1_000, 45_000);
        for _ in 0..500 {
            window.downstream.record(30_000);
            window.pool_wait.record(5_000);
        }
        let own = Capacity { cores: 1.0, concurrency: Some(8.0), pool_scope: PoolScope::Own };
        let request = Capacity { pool_scope: PoolScope::Request, ..own };
        // Own: (45 − 30) ms × 100/s = 1.5 in hand. Request: 45 ms × 100/s = 4.5.
        assert!((utilization(&window, 5000, own).mean_in_flight - 1.5).abs() < 0.1);
        assert!((utilization(&window, 5000, request).mean_in_flight - 4.5).abs() < 0.2);
    }

    #[test]
    fn only_some_verdicts_move_and_never_the_wrong_way() {
        let busy = stats(2500, 2500, 4000, 5000);
        let idle = stats(50, 50, 1000, 2000);
        let capacity = Capacity { cores: 1.0, concurrency: None, pool_scope: PoolScope::Own };
        assert_eq!(advise(Verdict::Delegated, &busy, 5000, 3, 1.0, capacity).desired_replicas, 3);
        assert_eq!(advise(Verdict::InsufficientData, &busy, 5000, 3, 1.0, capacity).desired_replicas, 3);
        assert_eq!(advise(Verdict::Idle, &idle, 5000, 4, 0.7, capacity).desired_replicas, 1);
        assert_eq!(advise(Verdict::RootCause, &idle, 5000, 4, 0.7, capacity).desired_replicas, 4);
    }

    #[test]
    fn cgroup_cpu_max() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2.0));
        assert_eq!(parse_cpu_max("50000 100000"), Some(0.5));
        assert_eq!(parse_cpu_max("garbage"), None);
    }
}
