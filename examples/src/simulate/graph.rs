//! Seeded call graphs shaped like published production microservice graphs (Alibaba's 2021 traces, Meta's and
//! Uber's descriptions): most services call one to three others, a few call dozens (heavy-tailed fan-out), a few
//! shared services (storage, auth, config) are called by a large part of the graph, depth reaches about ten,
//! some calls are optional and some are made in parallel. Replicas range from 1 to 100, sized so that every
//! service runs at 30–60 % of its capacity before a fault.

use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Exp1, Zipf};

/// The deepest level below an entry.
pub const MAX_DEPTH: usize = 10;
/// Replicas of a service at most (the generator adds workers beyond it).
pub const MAX_REPLICAS: u32 = 100;
/// Callees per service at most.
pub const MAX_FAN_OUT: usize = 40;

/// How a service holds its workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// For its own work only (an async service).
    Own,
    /// For the whole request, calls included (thread-per-request).
    Request,
}

/// One call a service makes per request.
#[derive(Clone, Debug)]
pub struct Call {
    pub callee: usize,
    /// Made on this share of requests (1: always).
    pub probability: f64,
    /// Made together with the other parallel calls of the service (they overlap; the last to end is on the
    /// critical path).
    pub parallel: bool,
}

/// One service of a generated graph.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub level: usize,
    /// Requests per second from outside (entries only).
    pub external_rate: f64,
    pub calls: Vec<Call>,
    pub replicas: u32,
    /// Workers per replica.
    pub workers: u32,
    pub pool: Pool,
    /// Mean time a request holds a worker for its own work, and the CPU part of it (milliseconds).
    pub service_ms: f64,
    pub cpu_ms: f64,
    /// Cores per replica.
    pub cores: f64,
}

/// A generated call graph: services in levels, calls only to deeper levels (no cycles).
#[derive(Clone, Debug)]
pub struct Graph {
    pub services: Vec<Service>,
    /// Requests per second each service receives (all replicas), before any fault.
    pub rates: Vec<f64>,
    /// Callers of each service.
    pub callers: Vec<Vec<usize>>,
}

impl Graph {
    /// A graph of `size` services from `seed`; the same seed gives the same graph.
    pub fn generate(size: usize, seed: u64) -> Graph {
        let size = size.max(2);
        let mut rng = StdRng::seed_from_u64(seed);
        // Entries: about one service in 50, at least one.
        let entries = (size / 50).max(1);
        // Levels: entries at 0, the rest spread over 1..=MAX_DEPTH, thinning with depth.
        let mut levels: Vec<usize> = (0..size)
            .map(
                |index| {
                    if index < entries { 0 } else { 1 + (rng.random::<f64>().powf(1.6) * MAX_DEPTH as f64) as usize }
                },
            )
            .map(|level| level.min(MAX_DEPTH))
            .collect();
        levels[entries..].sort_unstable();
        // A few hot shared services, deep in the graph, that many services call.
        let hot: Vec<usize> = (0..(size / 200).max(1)).map(|_| rng.random_range(size / 2..size)).collect();
        let fan_out = Zipf::new(MAX_FAN_OUT as f64, 1.6).expect("valid Zipf parameters");
        let mut services: Vec<Service> = (0..size)
            .map(|index| {
                let cpu_ms = 0.2 + rng.random::<f64>() * 2.0;
                Service {
                    name: format!("svc-{index:05}"),
                    level: levels[index],
                    external_rate: if index < entries { 50.0 + rng.random::<f64>() * 450.0 } else { 0.0 },
                    calls: Vec::new(),
                    replicas: 1,
                    workers: 16,
                    pool: if rng.random::<f64>() < 0.2 { Pool::Request } else { Pool::Own },
                    service_ms: cpu_ms + 1.0 + Distribution::<f64>::sample(&Exp1, &mut rng) * 4.0,
                    cpu_ms,
                    cores: 1.0,
                }
            })
            .collect();
        let first_at = |level: usize| levels.partition_point(|l| *l < level);
        for index in 0..size {
            let level = levels[index];
            let deeper = first_at(level + 1);
            if deeper >= size {
                continue;
            }
            // Fewer calls deeper down: the leaves of a request's tree are storage and caches.
            let wanted =
                (fan_out.sample(&mut rng) as usize).saturating_sub(1) * (MAX_DEPTH + 1 - level) / (MAX_DEPTH + 1);
            let wanted = wanted.min(size - deeper);
            let mut callees: Vec<usize> = Vec::with_capacity(wanted + 1);
            for _ in 0..wanted {
                // Mostly the next levels down; now and then a hot shared service.
                let callee = match hot.iter().find(|h| **h >= deeper && rng.random::<f64>() < 0.08) {
                    Some(hot) => *hot,
                    None => {
                        let reach = first_at(level + 3).max(deeper + 1).min(size);
                        rng.random_range(deeper..reach)
                    }
                };
                if !callees.contains(&callee) {
                    callees.push(callee);
                }
            }
            // Wide fan-outs are made in parallel (a sequence of dozens of calls would never meet a latency goal).
            let parallel = callees.len() > 3 || (callees.len() > 1 && rng.random::<f64>() < 0.4);
            services[index].calls = callees
                .into_iter()
                .map(|callee| Call {
                    callee,
                    probability: if rng.random::<f64>() < 0.15 { 0.3 + rng.random::<f64>() * 0.6 } else { 1.0 },
                    parallel,
                })
                .collect();
        }
        // Every service below the entries has a caller: an orphan is called by a service a level or more above.
        let mut callers: Vec<Vec<usize>> = vec![Vec::new(); size];
        for (index, service) in services.iter().enumerate() {
            for call in &service.calls {
                callers[call.callee].push(index);
            }
        }
        for index in entries..size {
            if callers[index].is_empty() {
                let above = first_at(levels[index]);
                let caller = rng.random_range(0..above.max(1));
                services[caller].calls.push(Call { callee: index, probability: 1.0, parallel: false });
                callers[index].push(caller);
            }
        }
        // Rates, in level order (callers come first).
        let mut rates: Vec<f64> = services.iter().map(|s| s.external_rate).collect();
        for index in 0..size {
            let rate = rates[index];
            for call in services[index].calls.clone() {
                rates[call.callee] += rate * call.probability;
            }
        }
        // A request's mean time in each service, deepest first: what a thread-per-request worker is held for.
        let mut held_ms = vec![0.0; size];
        for index in (0..size).rev() {
            let service = &services[index];
            let call_ms = |call: &Call| 0.3 + held_ms[call.callee];
            let sequential: f64 =
                service.calls.iter().filter(|c| !c.parallel).map(|c| c.probability * call_ms(c)).sum();
            let parallel = service.calls.iter().filter(|c| c.parallel).map(call_ms).fold(0.0, f64::max);
            held_ms[index] = service.service_ms + sequential + parallel;
        }
        // Size each service for 30–60 % of its capacity: replicas first, then workers and cores beyond 100.
        for (index, service) in services.iter_mut().enumerate() {
            let target = 0.3 + rng.random::<f64>() * 0.3;
            let hold_ms = match service.pool {
                Pool::Own => service.service_ms,
                Pool::Request => held_ms[index],
            };
            let busy_workers = rates[index] * hold_ms / 1000.0;
            let busy_cores = rates[index] * service.cpu_ms / 1000.0;
            let replicas = (busy_workers / (f64::from(service.workers) * target)).ceil().max(1.0);
            service.replicas = (replicas as u32).clamp(1, MAX_REPLICAS);
            let per_replica = busy_workers / f64::from(service.replicas);
            service.workers = service.workers.max((per_replica / target).ceil() as u32);
            service.cores = (busy_cores / f64::from(service.replicas) / target).ceil().max(1.0);
        }
        Graph { services, rates, callers }
    }

    /// Every service `target` is reached from (its callers, theirs, up to the entries).
    pub fn ancestors(&self, target: usize) -> Vec<usize> {
        let mut seen = vec![false; self.services.len()];
        let mut stack = vec![target];
        let mut found = Vec::new();
        while let Some(next) = stack.pop() {
            for &caller in &self.callers[next] {
                if !seen[caller] {
                    seen[caller] = true;
                    found.push(caller);
                    stack.push(caller);
                }
            }
        }
        found
    }

    /// Calls per service (mean, and the largest).
    pub fn fan_out(&self) -> (f64, usize) {
        let total: usize = self.services.iter().map(|s| s.calls.len()).sum();
        let largest = self.services.iter().map(|s| s.calls.len()).max().unwrap_or(0);
        (total as f64 / self.services.len() as f64, largest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_graph_and_the_shape_is_bounded() {
        let (a, b) = (Graph::generate(1000, 7), Graph::generate(1000, 7));
        let names = |g: &Graph| g.services.iter().map(|s| (s.calls.len(), s.replicas)).collect::<Vec<_>>();
        assert_eq!(names(&a), names(&b));
        assert_ne!(names(&a), names(&Graph::generate(1000, 8)));
        for (index, service) in a.services.iter().enumerate() {
            assert!(service.level <= MAX_DEPTH);
            assert!((1..=MAX_REPLICAS).contains(&service.replicas));
            assert!(service.calls.iter().all(|call| a.services[call.callee].level > service.level), "no cycles");
            assert!(service.level == 0 || !a.callers[index].is_empty(), "{} has no caller", service.name);
        }
        let (mean, largest) = a.fan_out();
        assert!((1.0..=4.0).contains(&mean) && largest >= 10, "fan-out mean {mean}, largest {largest}");
    }
}
