//! Whose doing a worker pool's queue is (docs/DESIGN.md §1.7).
//!
//! In a service whose workers are held for the whole request ([`PoolScope::Request`]), a request queued for a
//! worker waits for the requests holding them, and those spend their worker time partly in the service's own work
//! and partly in calls: on the link to a callee and inside the callee's subtree. The queue (`pool_wait`, a part of
//! the service's `local_wait`) is shared out in proportion to that worker time, so that a caller starved by a slow
//! callee delegates to it instead of naming itself.
//!
//! When a callee's subtree under pressure holds workers, the pool's size is known, and the workers' other time, at
//! the rate requests arrive, would not have filled it (below the saturation level of the workers it really has),
//! the queue is wholly the pressured subtrees' and the links': without them nothing would have queued, however
//! much of the workers' time the service's own work and its calm callees take.
//!
//! Worker time in a callee's subtree counts as the callee's only when that subtree is under pressure — the
//! callee's reports say some service in it is at or above the saturation level — or when it was spent waiting on a
//! link deeper in it (the calls' largest wait a link). A callee that is merely slow by design holds workers as part
//! of the service's normal cost: a pool too small for it is the service's own problem, and more replicas of the
//! service are the fix. Time on a link is waiting by definition and always counts as the link's, whether it is the
//! link to the callee or one deeper in its subtree.

use std::{collections::HashMap, sync::Arc};

use crate::{
    aggregate::{WindowStats, stats::OutboundStats},
    decide::recommend::PoolScope,
    measure::record::WaitPoint,
};

/// How one window's pool wait divides.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolShares {
    /// Fraction of pool wait that is the service's own: its share of worker time (its work, its other waits, its
    /// calls to calm callees), or none when the queue is wholly the pressured subtrees' (above).
    pub own: f64,
    /// Per callee: the fraction on the link to it, and in its subtree (while under pressure, or waiting on a link
    /// deeper in it).
    pub callees: HashMap<Arc<str>, (f64, f64)>,
}

/// The time calls to a callee waited on links in its subtree, when a link is the subtree's usual largest wait: the
/// links' share of the named points times the edge's summed largest waits.
fn deeper_links_us(edge: &OutboundStats) -> f64 {
    // Only where a link is the subtree's usual largest wait: that is the point the rule compares for this callee
    // (`policy::candidates` reads the same `usual_wait_point`), so the time moved there lands on the link.
    if !edge.usual_wait_point().is_some_and(|point| matches!(point, WaitPoint::Net { .. })) {
        return 0.0;
    }
    let (mut at_links, mut named) = (0_u64, 0_u64);
    for (point, count, _) in &edge.remote_wait_at {
        named = named.saturating_add(*count);
        if matches!(point, WaitPoint::Net { .. }) {
            at_links = at_links.saturating_add(*count);
        }
    }
    if at_links == 0 {
        return 0.0;
    }
    edge.remote_wait.sum_us() as f64 * at_links as f64 / named as f64
}

impl PoolShares {
    /// The shares of a window; `None` when the pool is not held across calls or nothing queued for it.
    /// `pool` is the pool's scope and its workers per replica when declared; `pressure` each callee's subtree
    /// utilisation from its reports; `saturation` the level that counts.
    pub fn of(
        stats: &WindowStats,
        pool: (PoolScope, Option<f64>),
        window_ms: u64,
        pressure: &HashMap<String, f64>,
        saturation: f64,
    ) -> Option<Self> {
        let (scope, size) = pool;
        if scope != PoolScope::Request || stats.pool_wait.sum_us() == 0 {
            return None;
        }
        // Worker time: each request from the grant of its worker to its response.
        let worker_us = stats.total.sum_us().saturating_sub(stats.pool_wait.sum_us()) as f64;
        let downstream_us = stats.downstream.sum_us() as f64;
        let calls_us: f64 = stats.outbound.values().map(|edge| edge.client_total.sum_us() as f64).sum();
        if worker_us <= 0.0 || calls_us <= 0.0 {
            return Some(Self { own: 1.0, callees: HashMap::new() });
        }
        // Parallel calls overlap: scale their sum to the wall time some call was in flight.
        let scale = (downstream_us / calls_us).min(1.0);
        let mut callees = HashMap::new();
        let mut attributed = 0.0;
        // The part held in subtrees under pressure: what can make a pool queue that would not otherwise.
        let mut pressed = 0.0;
        for (callee, edge) in &stats.outbound {
            let in_callee = edge.client_total.sum_us() as f64 * scale;
            let on_link = (edge.net_wait.sum_us() as f64 * scale).min(in_callee);
            let under_pressure = pressure.get(&**callee).is_some_and(|load| *load >= saturation);
            let in_subtree = if under_pressure {
                pressed += (in_callee - on_link) / worker_us;
                in_callee - on_link
            } else {
                // Calls whose largest wait was a link deeper in the subtree held their workers waiting on it.
                (deeper_links_us(edge) * scale).min(in_callee - on_link)
            };
            let (link, subtree) = (on_link / worker_us, in_subtree / worker_us);
            attributed += link + subtree;
            callees.insert(callee.clone(), (link, subtree));
        }
        // The workers the requests' other time would keep busy at the rate they arrive (a full pool completes
        // fewer than arrive): below saturation of the workers it really has, nothing would have queued without the
        // subtrees under pressure, and the queue is all theirs and the links'. The pool is full (something
        // queued), so the workers busy on average are as many as it has: fewer than declared when a fault shrank
        // it, and then the declared size would flatter it.
        let seconds = (window_ms as f64 / 1000.0).max(0.001);
        let in_flight = worker_us / 1e6 / seconds;
        let demand = stats.arrivals.max(stats.requests) as f64 / stats.requests.max(1) as f64;
        let rest_in_flight = in_flight * (1.0 - attributed).max(0.0) * demand;
        let would_not_queue =
            pressed > 0.0 && size.is_some_and(|size| size > 0.0 && rest_in_flight < saturation * size.min(in_flight));
        if would_not_queue && attributed > 0.0 {
            for (link, subtree) in callees.values_mut() {
                *link /= attributed;
                *subtree /= attributed;
            }
            return Some(Self { own: 0.0, callees });
        }
        Some(Self { own: (1.0 - attributed).clamp(0.0, 1.0), callees })
    }

    /// The part of `pool_us` on the link to `callee` and in its subtree.
    pub fn callee_us(&self, callee: &str, pool_us: u64) -> (u64, u64) {
        let (link, subtree) = self.callees.get(callee).copied().unwrap_or_default();
        ((link * pool_us as f64) as u64, (subtree * pool_us as f64) as u64)
    }

    /// The fraction held by callees (their links, their subtrees under pressure, the links deeper in them).
    pub fn held_by_callees(&self) -> f64 {
        self.callees.values().map(|(link, subtree)| link + subtree).sum::<f64>().min(1.0)
    }

    /// The callees whose subtrees held workers, largest share first.
    pub fn holders(&self) -> Vec<Arc<str>> {
        let mut holders: Vec<(&Arc<str>, f64)> =
            self.callees.iter().filter(|(_, (_, subtree))| *subtree > 0.0).map(|(c, (_, s))| (c, *s)).collect();
        holders.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        holders.into_iter().map(|(callee, _)| callee.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{histogram::Histogram, stats::OutboundStats};

    fn histogram(value_us: u64, count: u64) -> Histogram {
        Histogram::repeated(value_us, count)
    }

    /// 100 requests: 50 ms queued for a worker, then 10 ms of their own and one 40 ms call to "c" (1 ms of it on
    /// the link).
    fn starved() -> WindowStats {
        let mut stats = WindowStats::new(1);
        stats.requests = 100;
        stats.total = histogram(100_000, 100);
        stats.pool_wait = histogram(50_000, 100);
        stats.local_wait = histogram(55_000, 100);
        stats.downstream = histogram(40_000, 100);
        stats.outbound.insert(
            "c".into(),
            OutboundStats {
                calls: 100,
                client_total: histogram(40_000, 100),
                net_wait: histogram(1_000, 100),
                ..OutboundStats::default()
            },
        );
        stats
    }

    #[test]
    fn a_callee_under_pressure_holds_its_share_of_the_workers() {
        let pressure: HashMap<String, f64> = [("c".to_string(), 1.4)].into();
        let shares = PoolShares::of(&starved(), (PoolScope::Request, None), 1000, &pressure, 0.9).unwrap();
        // Worker time 50 ms: 39 ms in c's subtree, 1 ms on the link, 10 ms own.
        assert!((shares.own - 0.2).abs() < 0.02, "{shares:?}");
        let (link, subtree) = shares.callee_us("c", 50_000);
        assert!((900..=1_100).contains(&link) && (38_000..=40_000).contains(&subtree), "{link} {subtree}");
        assert_eq!(shares.holders(), vec![Arc::from("c")]);
    }

    #[test]
    fn a_pool_that_would_not_queue_without_the_callee_under_pressure_is_wholly_its_doing() {
        let pressure: HashMap<String, f64> = [("c".to_string(), 1.4)].into();
        // Worker time 5 s in a 1 s window, 1 s of it outside c (its own 10 ms per request): one worker busy on
        // average without c. A pool of 4 would not have queued (1 < 0.9 × 4); a pool of 1 would have.
        let whole = PoolShares::of(&starved(), (PoolScope::Request, Some(4.0)), 1000, &pressure, 0.9).unwrap();
        assert_eq!(whole.own, 0.0);
        let (link, subtree) = whole.callee_us("c", 50_000);
        assert!(link + subtree >= 49_900 && link + subtree <= 50_000, "{link} {subtree}");
        assert!((1_100..=1_400).contains(&link), "the link keeps its share of the attributed time: {link}");
        let shared = PoolShares::of(&starved(), (PoolScope::Request, Some(1.0)), 1000, &pressure, 0.9).unwrap();
        assert!((shared.own - 0.2).abs() < 0.02, "{shared:?}");
        // Four times as many arrived as completed: at that rate the other time alone keeps 4 workers busy, over
        // 0.9 × 4, so the pool would have queued anyway and the queue is shared.
        let mut flooded = starved();
        flooded.arrivals = 400;
        let shared = PoolShares::of(&flooded, (PoolScope::Request, Some(4.0)), 1000, &pressure, 0.9).unwrap();
        assert!((shared.own - 0.2).abs() < 0.02, "{shared:?}");
        // A calm callee is still the service's own cost, whatever the pool's size; and a pool shrunk below its
        // declared 100 workers (5 busy on average) is full by its own doing: the link's 2 % moves nothing more.
        let calm: HashMap<String, f64> = [("c".to_string(), 0.3)].into();
        for size in [4.0, 100.0] {
            let own = PoolShares::of(&starved(), (PoolScope::Request, Some(size)), 1000, &calm, 0.9).unwrap();
            assert!((own.own - 0.98).abs() < 0.01, "{own:?}");
        }
    }

    #[test]
    fn workers_waiting_on_a_slow_link_deeper_in_a_calm_subtree_are_the_links() {
        // c's subtree is calm, but 30 of each call's 40 ms were its largest wait: the link from c to d.
        let mut stats = starved();
        let edge = stats.outbound.get_mut("c").unwrap();
        edge.remote_wait = histogram(30_000, 100);
        let link = WaitPoint::Net { from: "c".into(), to: "d".into() };
        edge.remote_wait_at = vec![(link, 100, 30_000)];
        let calm: HashMap<String, f64> = [("c".to_string(), 0.3)].into();
        let shares = PoolShares::of(&stats, (PoolScope::Request, None), 1000, &calm, 0.9).unwrap();
        // Of 50 ms of worker time: 1 on the link to c, 30 on the link below it, 19 the service's own.
        assert!((shares.own - 0.38).abs() < 0.02, "{shares:?}");
        assert_eq!(shares.holders(), vec![Arc::from("c")]);
        // Calls whose largest wait was a service's own work hold nothing of a link's.
        let edge = stats.outbound.get_mut("c").unwrap();
        edge.remote_wait_at = vec![(WaitPoint::Local { service: "d".into() }, 100, 30_000)];
        let shares = PoolShares::of(&stats, (PoolScope::Request, None), 1000, &calm, 0.9).unwrap();
        assert!((shares.own - 0.98).abs() < 0.01, "{shares:?}");
    }

    #[test]
    fn a_callee_slow_by_design_is_the_service_s_own_cost() {
        let calm: HashMap<String, f64> = [("c".to_string(), 0.3)].into();
        let shares = PoolShares::of(&starved(), (PoolScope::Request, None), 1000, &calm, 0.9).unwrap();
        // Only the link's 1 ms of 50 leaves the service.
        assert!((shares.own - 0.98).abs() < 0.01, "{shares:?}");
        assert!(shares.holders().is_empty());
        // An async service's workers hold nothing across calls; nothing to share without a queue.
        assert_eq!(PoolShares::of(&starved(), (PoolScope::Own, None), 1000, &calm, 0.9), None);
        let mut no_queue = starved();
        no_queue.pool_wait = Histogram::new();
        assert_eq!(PoolShares::of(&no_queue, (PoolScope::Request, None), 1000, &calm, 0.9), None);
    }
}
