//! The decision rule (the dissertation's, run in every service; docs/DESIGN.md §1.4).
//!
//! 1. Triggered? An entry service is when its own `total` at the SLO percentile passes `trigger_fraction` of the
//!    SLO; any service is when a caller delegated this window to it.
//! 2. If triggered, compare at that percentile: its own `local_wait`, each outbound edge's `net_wait`, and each
//!    edge's `remote_wait` (the largest wait in the callee's subtree, with where it was).
//!    In a service whose workers are held for the whole request, the queue for a worker is shared out among its
//!    own wait, the links and the callees whose subtrees held the workers ([`PoolShares`]).
//! 3. `max` mode: follow the largest. A `remote_wait` → delegate to the callee(s) whose subtree holds that wait
//!    point; a `net_wait` → the link is the bottleneck (`network`); its own `local_wait` → `root-cause`.
//!    `sum` mode: every wait above `sum_threshold` of the observed latency counts, so several callees can be
//!    delegated to (and the service itself be a root cause) at once.
//! 4. Not triggered: `saturated` when utilisation stayed above target for two windows in a row (the agent passes
//!    the lower of the two) — unless the workers of a pool held across calls are mostly held by callees under
//!    pressure, which is `delegated` to them ([`pool`](crate::decide::pool)) — `idle` when it stayed well below target for two windows in a row (the
//!    operator's scale-down stabilisation does the longer wait), else `healthy`.
//!
//! Missing data never scales anything: too few requests, or a stale neighbour on the path, gives
//! `insufficient-data`.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use rootscale_proto::v1 as proto;

use crate::{
    aggregate::{WindowStats, histogram::Histogram, stats::wait_point_to_proto},
    decide::{pool::PoolShares, recommend::PoolScope},
    measure::{record::WaitPoint, sample::SAMPLE_RESERVOIR},
};

/// A bottleneck reached through several callees is followed through each whose wait there is at least
/// 1/`SHARED_POINT_RATIO` of the largest. Not 1/2: a queue that grows while a request makes its calls in turn, and a
/// window's sample of a few requests, put one visit's wait at half the other's or below (the localization matrix's
/// diamond, a pool cut at its shared service, measured 1/16 sampled: the second branch went undelegated in 2 runs
/// of 24 at one half).
const SHARED_POINT_RATIO: u64 = 4;

/// How waits are combined (docs/DESIGN.md §1.4, step 5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AggregationMode {
    /// Follow the single largest wait.
    #[default]
    Max,
    /// Act on every wait above the threshold: several scaling actions at once.
    Sum,
}

impl std::str::FromStr for AggregationMode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "max" => Ok(Self::Max),
            "sum" => Ok(Self::Sum),
            other => Err(format!("unknown aggregation mode {other:?}: use max or sum")),
        }
    }
}

/// A latency SLO: `latency_us` at `percentile`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slo {
    pub latency_us: u64,
    pub percentile: f64,
}

/// The knobs of the rule.
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    pub mode: AggregationMode,
    /// Fraction of the SLO at which an entry service starts looking (default 0.8).
    pub trigger_fraction: f64,
    /// Fewer requests than this in a window is too little data (default 10).
    pub min_requests: u64,
    /// Edges with fewer calls than this in a window are not compared (default 5).
    pub min_edge_calls: u64,
    /// `sum` mode: a wait counts when it is at least this fraction of the observed latency (default 0.25).
    pub sum_threshold: f64,
    /// Target utilisation for `saturated` (default 0.7).
    pub target_utilization: f64,
    /// `idle` when utilisation stays below this fraction of the target (default 0.5).
    pub idle_fraction: f64,
    /// A service at or above this utilisation delays reading requests and responses (default 0.9); a net wait
    /// on a link with a saturated end is that end's CPU, not the link.
    pub saturation: f64,
    /// A triggered service names a bottleneck only when the largest wait is at least this fraction of its
    /// observed latency (default 0.1); below that no wait stands out.
    pub min_share: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            mode: AggregationMode::Max,
            trigger_fraction: 0.8,
            min_requests: 10,
            min_edge_calls: 5,
            sum_threshold: 0.25,
            target_utilization: 0.7,
            idle_fraction: 0.5,
            saturation: 0.9,
            min_share: 0.1,
        }
    }
}

/// A delegation received from a caller for this window.
#[derive(Clone, Debug, PartialEq)]
pub struct Delegated {
    pub from: String,
    pub percentile: f64,
    /// Services the delegation passed through, entry first.
    pub path: Vec<String>,
    /// Arrivals over completions, the largest at any service on the path (at least 1).
    pub unserved_ratio: f64,
}

/// Everything the rule looks at.
pub struct PolicyInput<'a> {
    pub service: &'a str,
    pub stats: &'a WindowStats,
    pub window_ms: u64,
    /// The SLO, if this is an entry service.
    pub slo: Option<Slo>,
    /// Delegations received from callers for this window.
    pub delegations: &'a [Delegated],
    /// Callees whose agents did not answer the last exchange.
    pub stale_callees: &'a HashSet<String>,
    /// Neighbours' CPU utilisation, from their last reports.
    pub neighbor_cpu: &'a HashMap<String, f64>,
    /// Neighbours' subtree utilisation (the largest of theirs and their callees'), from their last reports.
    pub neighbor_subtree: &'a HashMap<String, f64>,
    /// How long a request holds a worker of this service's pool.
    pub pool_scope: PoolScope,
    /// Workers per replica in that pool, when declared.
    pub pool_size: Option<f64>,
    /// This replica's CPU utilisation over the window.
    pub cpu_utilization: f64,
    /// This replica's sustained utilisation (the larger of CPU and pool; the agent passes the lower of this
    /// window's and the previous one's), 0 when unknown.
    pub utilization: f64,
    /// Whether utilisation stayed below `idle_fraction × target` for the last two windows.
    pub idle_throughout: bool,
}

/// The verdict kinds (docs/DESIGN.md §1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    RootCause,
    Delegated,
    Network,
    Saturated,
    Idle,
    InsufficientData,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::RootCause => "root-cause",
            Verdict::Delegated => "delegated",
            Verdict::Network => "network",
            Verdict::Saturated => "saturated",
            Verdict::Idle => "idle",
            Verdict::InsufficientData => "insufficient-data",
        }
    }

    /// The verdict a wire value names; `None` for an unknown or unspecified one.
    pub fn from_proto(wire: i32) -> Option<Self> {
        match proto::Verdict::try_from(wire).ok()? {
            proto::Verdict::Healthy => Some(Verdict::Healthy),
            proto::Verdict::RootCause => Some(Verdict::RootCause),
            proto::Verdict::Delegated => Some(Verdict::Delegated),
            proto::Verdict::Network => Some(Verdict::Network),
            proto::Verdict::Saturated => Some(Verdict::Saturated),
            proto::Verdict::Idle => Some(Verdict::Idle),
            proto::Verdict::InsufficientData => Some(Verdict::InsufficientData),
            proto::Verdict::Unspecified => None,
        }
    }

    pub fn to_proto(self) -> proto::Verdict {
        match self {
            Verdict::Healthy => proto::Verdict::Healthy,
            Verdict::RootCause => proto::Verdict::RootCause,
            Verdict::Delegated => proto::Verdict::Delegated,
            Verdict::Network => proto::Verdict::Network,
            Verdict::Saturated => proto::Verdict::Saturated,
            Verdict::Idle => proto::Verdict::Idle,
            Verdict::InsufficientData => proto::Verdict::InsufficientData,
        }
    }
}

/// One wait the rule compared.
#[derive(Clone, Debug, PartialEq)]
pub struct Compared {
    pub point: WaitPoint,
    pub us: u64,
    /// The callee it was measured on, for net and remote waits.
    pub via: Option<Arc<str>>,
}

/// How a service's own wait was estimated for the whole window, because its outbound calls could not be tied to
/// their requests (a sidecar's application that does not pass the trace context on; docs/DESIGN.md §1.8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalWaitEstimate {
    pub untied_calls: u64,
    pub untied_us: u64,
    /// The fraction of the window's `local_wait` those calls account for: taken out of the local wait compared.
    pub untied_share: f64,
}

impl LocalWaitEstimate {
    fn of(stats: &WindowStats) -> Option<Self> {
        (stats.untied_calls > 0).then(|| Self {
            untied_calls: stats.untied_calls,
            untied_us: stats.untied_us,
            untied_share: stats.untied_share(),
        })
    }
}

/// `local_us` of the window less the share of its untied calls (none: all of it).
fn own_wait(stats: &WindowStats, local_us: u64) -> u64 {
    match stats.untied_share() {
        0.0 => local_us,
        share => (local_us as f64 * (1.0 - share)) as u64,
    }
}

/// What the rule decided, with the evidence.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    /// For a root cause: "cpu" or "local".
    pub kind: Option<&'static str>,
    /// The largest wait, when the verdict names one.
    pub bottleneck: Option<WaitPoint>,
    /// Callees to delegate to.
    pub delegated_to: Vec<Arc<str>>,
    /// The percentile the waits were read at.
    pub percentile: f64,
    pub observed_total_us: u64,
    pub slo_us: Option<u64>,
    pub requests: u64,
    pub compared: Vec<Compared>,
    pub reason: String,
    /// Set when this service's own wait was estimated for the window rather than measured per request.
    pub local_wait_estimate: Option<LocalWaitEstimate>,
    /// One request in this many was measured (1: every one).
    pub sample_every: u32,
}

impl Decision {
    fn new(verdict: Verdict, input: &PolicyInput<'_>, percentile: f64, observed_total_us: u64, reason: String) -> Self {
        Self {
            verdict,
            kind: None,
            bottleneck: None,
            delegated_to: Vec::new(),
            percentile,
            observed_total_us,
            slo_us: input.slo.map(|slo| slo.latency_us),
            requests: input.stats.requests,
            compared: Vec::new(),
            reason,
            local_wait_estimate: LocalWaitEstimate::of(input.stats),
            sample_every: input.stats.sample_every.max(1),
        }
    }

    /// A decision made without data (no window yet).
    pub fn no_data(reason: &str) -> Self {
        Self {
            verdict: Verdict::InsufficientData,
            kind: None,
            bottleneck: None,
            delegated_to: Vec::new(),
            percentile: 95.0,
            observed_total_us: 0,
            slo_us: None,
            requests: 0,
            compared: Vec::new(),
            reason: reason.to_string(),
            local_wait_estimate: None,
            sample_every: 1,
        }
    }

    pub fn to_proto(&self) -> proto::Decision {
        proto::Decision {
            verdict: self.verdict.to_proto() as i32,
            kind: self.kind.unwrap_or_default().to_string(),
            bottleneck: self.bottleneck.as_ref().map(wait_point_to_proto),
            delegated_to: self.delegated_to.iter().map(|callee| callee.to_string()).collect(),
            evidence: Some(proto::Evidence {
                percentile: self.percentile,
                observed_total_us: self.observed_total_us,
                slo_us: self.slo_us.unwrap_or(0),
                requests: self.requests,
                // Bounded so every report passes its receiver's limits (64 entries, 1 KiB of reason).
                compared: self
                    .compared
                    .iter()
                    .take(64)
                    .map(|compared| proto::ComparedWait {
                        point: Some(wait_point_to_proto(&compared.point)),
                        value_us: compared.us,
                        via_callee: compared.via.as_deref().unwrap_or_default().to_string(),
                    })
                    .collect(),
                reason: truncate(&self.reason, 1000),
                local_wait_estimate: self.local_wait_estimate.map(|estimate| proto::LocalWaitEstimate {
                    untied_calls: estimate.untied_calls,
                    untied_us: estimate.untied_us,
                    untied_share: estimate.untied_share,
                }),
                sample_every: self.sample_every,
            }),
        }
    }
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn at(histogram: &Histogram, percentile: f64) -> u64 {
    histogram.percentile_us(percentile).unwrap_or(0)
}

fn ms(us: u64) -> String {
    format!("{:.1}ms", us as f64 / 1000.0)
}

/// The waits a triggered service compares, largest first. A pool held across calls has its queue shared out
/// (`decide/pool.rs`): the part held by links and by callees' subtrees moves from the service's own wait to theirs.
/// Calls not tied to their requests have the window's share of their time taken out of the service's own wait.
fn candidates(
    input: &PolicyInput<'_>,
    config: &PolicyConfig,
    shares: Option<&PoolShares>,
    percentile: f64,
) -> Vec<Compared> {
    let stats = input.stats;
    let own: Arc<str> = input.service.into();
    let pool_us = at(&stats.pool_wait, percentile);
    let shared_out = shares.map_or(0, |shares| ((1.0 - shares.own) * pool_us as f64) as u64);
    let mut compared = vec![Compared {
        point: WaitPoint::Local { service: own.clone() },
        us: own_wait(stats, at(&stats.local_wait, percentile)).saturating_sub(shared_out),
        via: None,
    }];
    let mut edges: Vec<_> = stats.outbound.iter().filter(|(_, edge)| edge.calls >= config.min_edge_calls).collect();
    edges.sort_by(|a, b| a.0.cmp(b.0));
    for (callee, edge) in edges {
        let (on_link, in_subtree) = shares.map_or((0, 0), |shares| shares.callee_us(callee, pool_us));
        if !edge.net_wait.is_empty() || on_link > 0 {
            compared.push(Compared {
                point: WaitPoint::Net { from: own.clone(), to: callee.clone() },
                us: at(&edge.net_wait, percentile) + on_link,
                via: Some(callee.clone()),
            });
        }
        // Where the callee's subtree waited most often; the callee itself when it did not say.
        let point = edge.usual_wait_point().cloned().unwrap_or_else(|| WaitPoint::Local { service: callee.clone() });
        compared.push(Compared {
            point,
            us: at(&edge.remote_wait, percentile) + in_subtree,
            via: Some(callee.clone()),
        });
    }
    compared.sort_by_key(|c| std::cmp::Reverse(c.us));
    compared
}

/// Runs the rule on one closed window.
pub fn decide(input: &PolicyInput<'_>, config: &PolicyConfig) -> Decision {
    let mut decision = decide_measured(input, config);
    if let Some(estimate) = decision.local_wait_estimate {
        decision.reason.push_str(&format!(
            " (own wait estimated for the window: {} calls not tied to their request, {:.0}% of its local wait)",
            estimate.untied_calls,
            estimate.untied_share * 100.0
        ));
    }
    if decision.sample_every > 1 {
        decision.reason.push_str(&format!(
            " (made on a sample: up to {SAMPLE_RESERVOIR} requests a window, then one in {}; counts weighted)",
            decision.sample_every
        ));
    }
    decision
}

fn decide_measured(input: &PolicyInput<'_>, config: &PolicyConfig) -> Decision {
    let stats = input.stats;
    let percentile =
        input.slo.map(|slo| slo.percentile).or_else(|| input.delegations.first().map(|d| d.percentile)).unwrap_or(95.0);
    let observed = at(&stats.total, percentile);
    // Arrivals count too: an overloaded service completes few requests exactly when it matters.
    if stats.requests.max(stats.arrivals) < config.min_requests {
        return Decision::new(
            Verdict::InsufficientData,
            input,
            percentile,
            observed,
            format!("{} requests in the window, fewer than the {} needed", stats.requests, config.min_requests),
        );
    }
    // A callee this window called whose agent stopped answering: its subtree is unknown, so nothing here is
    // decided on a partial picture.
    let mut stale: Vec<&str> = stats
        .outbound
        .iter()
        .filter(|(callee, edge)| edge.calls > 0 && input.stale_callees.contains(&***callee))
        .map(|(callee, _)| &**callee)
        .collect();
    if !stale.is_empty() {
        stale.sort_unstable();
        return Decision::new(
            Verdict::InsufficientData,
            input,
            percentile,
            observed,
            format!("the agent of {} did not answer the last report", stale.join(", ")),
        );
    }
    let slo_trigger = input.slo.filter(|slo| observed as f64 >= config.trigger_fraction * slo.latency_us as f64);
    let shares = PoolShares::of(
        stats,
        (input.pool_scope, input.pool_size),
        input.window_ms,
        input.neighbor_subtree,
        config.saturation,
    );
    if slo_trigger.is_none() && input.delegations.is_empty() {
        let target = config.target_utilization;
        let held = shares.as_ref().filter(|shares| input.utilization > target && shares.held_by_callees() >= 0.5);
        if let Some(shares) = held {
            // A full pool of workers waiting on callees under pressure: theirs to answer, not this service's.
            let mut decision = Decision::new(Verdict::Delegated, input, percentile, observed, String::new());
            decision.delegated_to = shares.holders();
            decision.reason = format!(
                "utilisation {:.0}% above the {:.0}% target, {:.0}% of its workers' time held by {}",
                input.utilization * 100.0,
                target * 100.0,
                shares.held_by_callees() * 100.0,
                decision.delegated_to.iter().map(|c| &**c).collect::<Vec<_>>().join(", ")
            );
            if !decision.delegated_to.is_empty() {
                return decision;
            }
        }
        let (verdict, reason) = if input.utilization > target {
            (
                Verdict::Saturated,
                format!("utilisation {:.0}% above the {:.0}% target", input.utilization * 100.0, target * 100.0),
            )
        } else if input.idle_throughout {
            (
                Verdict::Idle,
                format!(
                    "utilisation below {:.0}% for the whole scale-down window (now {:.0}%)",
                    config.idle_fraction * target * 100.0,
                    input.utilization * 100.0
                ),
            )
        } else {
            let reason = match input.slo {
                Some(slo) => format!(
                    "p{percentile} {} within {:.0}% of the {} SLO",
                    ms(observed),
                    config.trigger_fraction * 100.0,
                    ms(slo.latency_us)
                ),
                None => "no SLO here and nothing delegated".to_string(),
            };
            (Verdict::Healthy, reason)
        };
        return Decision::new(verdict, input, percentile, observed, reason);
    }
    let trigger = match (slo_trigger, input.delegations.first()) {
        (Some(slo), _) => format!(
            "p{percentile} {} passed {:.0}% of the {} SLO",
            ms(observed),
            config.trigger_fraction * 100.0,
            ms(slo.latency_us)
        ),
        (None, Some(delegation)) => format!("delegated by {}", delegation.from),
        (None, None) => String::new(),
    };
    let compared = candidates(input, config, shares.as_ref(), percentile);
    let mut decision = Decision::new(Verdict::Healthy, input, percentile, observed, String::new());
    if (compared[0].us as f64) < config.min_share * observed as f64 {
        decision.reason = format!(
            "{trigger}; no wait stands out (the largest, {} {}, is under {:.0}% of the latency)",
            compared[0].point,
            ms(compared[0].us),
            config.min_share * 100.0
        );
        decision.compared = compared;
        return decision;
    }
    let chosen: Vec<&Compared> = match config.mode {
        AggregationMode::Max => {
            let top = &compared[0];
            // Every callee through which the same wait point is reached with a real share of the largest wait (a
            // diamond reaches one bottleneck twice).
            compared
                .iter()
                .filter(|c| {
                    c.via.is_some()
                        && c.point == top.point
                        && !matches!(c.point, WaitPoint::Net { .. })
                        && c.us.saturating_mul(SHARED_POINT_RATIO) >= top.us
                })
                .chain(std::iter::once(top))
                .collect()
        }
        AggregationMode::Sum => {
            let threshold = (config.sum_threshold * observed as f64) as u64;
            let over: Vec<&Compared> = compared.iter().filter(|c| c.us >= threshold && c.us > 0).collect();
            if over.is_empty() { vec![&compared[0]] } else { over }
        }
    };
    let own_point = &compared.iter().find(|c| c.via.is_none()).map(|c| c.point.clone());
    let mut own = false;
    let mut network = None;
    // Net waits not taken for the link because an end of it is CPU-saturated: this service, or callees.
    let mut own_saturated = false;
    let mut saturated_callees: Vec<String> = Vec::new();
    for choice in &chosen {
        match (&choice.point, &choice.via) {
            (point, None) if Some(point) == own_point.as_ref() => own = true,
            (WaitPoint::Net { from, to }, Some(via)) if &**from == input.service && to == via => {
                // A saturated end of the link delays reading what crossed it: that is CPU, not the network.
                let callee_cpu = input.neighbor_cpu.get(&**via).copied().unwrap_or(0.0);
                if input.cpu_utilization >= config.saturation {
                    own = true;
                    own_saturated = true;
                } else if callee_cpu >= config.saturation {
                    if !decision.delegated_to.contains(via) {
                        decision.delegated_to.push(via.clone());
                    }
                    saturated_callees.push(via.to_string());
                } else {
                    network.get_or_insert_with(|| choice.point.clone());
                }
            }
            (_, Some(via)) if !decision.delegated_to.contains(via) => decision.delegated_to.push(via.clone()),
            _ => {}
        }
    }
    decision.delegated_to.sort();
    let top = &compared[0];
    decision.compared = compared.clone();
    let stale: Vec<&Arc<str>> = decision.delegated_to.iter().filter(|c| input.stale_callees.contains(&***c)).collect();
    if !stale.is_empty() {
        decision.verdict = Verdict::InsufficientData;
        decision.reason = format!(
            "{trigger}; the largest wait is behind {}, whose agent did not answer",
            stale.iter().map(|c| &***c).collect::<Vec<_>>().join(", ")
        );
        decision.delegated_to.clear();
        return decision;
    }
    if own {
        decision.verdict = Verdict::RootCause;
        // CPU when the service's own work (busy) and its wait for a thread make up most of its time.
        let local_mean = stats.local_wait.mean_us() * (1.0 - stats.untied_share());
        let cpu_share =
            (stats.busy.mean_us() + stats.cpu_wait.mean_us()) / (stats.busy.mean_us() + local_mean).max(1.0);
        decision.kind = Some(if cpu_share >= 0.5 { "cpu" } else { "local" });
        decision.bottleneck = own_point.clone();
    } else if !decision.delegated_to.is_empty() {
        decision.verdict = Verdict::Delegated;
        // The largest chosen wait that sits behind a delegated callee.
        let behind = chosen.iter().find(|c| c.via.as_ref().is_some_and(|via| decision.delegated_to.contains(via)));
        decision.bottleneck = behind.map(|c| c.point.clone());
    } else if let Some(link) = network {
        decision.verdict = Verdict::Network;
        decision.bottleneck = Some(link);
    }
    let largest = format!("{} {}", top.point, ms(top.us));
    let saturated = if saturated_callees.is_empty() {
        String::new()
    } else {
        format!(" ({} saturated, so the link's wait is CPU)", saturated_callees.join(", "))
    };
    decision.reason = match decision.verdict {
        Verdict::RootCause if own_saturated => {
            decision.kind = Some("cpu");
            format!(
                "{trigger}; the largest wait ({largest}) is this service's own (it is CPU-saturated, so its link waits are its CPU)"
            )
        }
        Verdict::RootCause => format!("{trigger}; the largest wait is this service's own ({largest})"),
        Verdict::Delegated => {
            let names: Vec<&str> = decision.delegated_to.iter().map(|c| &**c).collect();
            format!("{trigger}; the largest wait ({largest}) is behind {}{saturated}", names.join(", "))
        }
        Verdict::Network => format!("{trigger}; the largest wait is the link ({largest})"),
        _ => format!("{trigger}; no wait stands out"),
    };
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::stats::OutboundStats;

    fn histogram(value_us: u64, count: u64) -> Histogram {
        Histogram::repeated(value_us, count)
    }

    static NO_PRESSURE: std::sync::LazyLock<HashMap<String, f64>> = std::sync::LazyLock::new(HashMap::new);

    fn window(total_us: u64, local_us: u64, busy_us: u64) -> WindowStats {
        let mut stats = WindowStats::new(1);
        stats.requests = 100;
        stats.total = histogram(total_us, 100);
        stats.local_wait = histogram(local_us, 100);
        stats.busy = histogram(busy_us, 100);
        stats.cpu_wait = histogram(0, 100);
        stats
    }

    fn edge(stats: &mut WindowStats, callee: &str, net_us: u64, remote_us: u64, at: WaitPoint) {
        stats.outbound.insert(
            callee.into(),
            OutboundStats {
                calls: 100,
                net_wait: histogram(net_us, 100),
                remote_wait: histogram(remote_us, 100),
                remote_wait_at: vec![(at, 100, remote_us)],
                ..OutboundStats::default()
            },
        );
    }

    fn local(service: &str) -> WaitPoint {
        WaitPoint::Local { service: service.into() }
    }

    /// An entry service "a" with a 100 ms p95 SLO, 30 % busy, nothing stale, no neighbour reports.
    fn entry<'a>(
        stats: &'a WindowStats,
        stale: &'a HashSet<String>,
        neighbor_cpu: &'a HashMap<String, f64>,
    ) -> PolicyInput<'a> {
        PolicyInput {
            service: "a",
            stats,
            window_ms: 5000,
            slo: Some(Slo { latency_us: 100_000, percentile: 95.0 }),
            delegations: &[],
            stale_callees: stale,
            neighbor_cpu,
            neighbor_subtree: &NO_PRESSURE,
            pool_scope: PoolScope::Own,
            pool_size: None,
            cpu_utilization: 0.3,
            utilization: 0.3,
            idle_throughout: false,
        }
    }

    fn run(stats: &WindowStats, slo_ms: Option<u64>, delegations: &[Delegated], mode: AggregationMode) -> Decision {
        let stale = HashSet::new();
        let input = PolicyInput {
            service: "a",
            stats,
            window_ms: 5000,
            slo: slo_ms.map(|ms| Slo { latency_us: ms * 1000, percentile: 95.0 }),
            delegations,
            stale_callees: &stale,
            neighbor_cpu: &HashMap::new(),
            neighbor_subtree: &NO_PRESSURE,
            pool_scope: PoolScope::Own,
            pool_size: None,
            cpu_utilization: 0.3,
            utilization: 0.3,
            idle_throughout: false,
        };
        decide(&input, &PolicyConfig { mode, ..PolicyConfig::default() })
    }

    #[test]
    fn below_the_trigger_an_entry_is_healthy() {
        let stats = window(70_000, 60_000, 1_000);
        assert_eq!(run(&stats, Some(100), &[], AggregationMode::Max).verdict, Verdict::Healthy);
    }

    #[test]
    fn its_own_wait_makes_a_root_cause() {
        let mut stats = window(90_000, 60_000, 1_000);
        edge(&mut stats, "b", 500, 20_000, local("b"));
        let decision = run(&stats, Some(100), &[], AggregationMode::Max);
        assert_eq!(decision.verdict, Verdict::RootCause);
        assert_eq!(decision.kind, Some("local"));
        assert_eq!(decision.bottleneck, Some(local("a")));
        assert!(decision.delegated_to.is_empty());
    }

    #[test]
    fn calls_not_tied_to_their_request_come_out_of_the_own_wait_as_a_window_estimate() {
        // A sidecar's application without trace context: each request's 70 ms call to b sits in its local wait
        // (80 ms), beside 10 ms of its own.
        let mut stats = window(90_000, 80_000, 1_000);
        edge(&mut stats, "b", 500, 69_000, local("b"));
        let measured = run(&stats, Some(100), &[], AggregationMode::Max);
        assert_eq!(measured.verdict, Verdict::RootCause, "untold, the calls' time looks like its own");
        assert_eq!(measured.local_wait_estimate, None);
        stats.untied_calls = 100;
        stats.untied_us = 100 * 70_000;
        let estimated = run(&stats, Some(100), &[], AggregationMode::Max);
        assert_eq!(estimated.verdict, Verdict::Delegated, "{}", estimated.reason);
        assert_eq!(estimated.delegated_to, vec![Arc::from("b")]);
        let estimate = estimated.local_wait_estimate.unwrap();
        assert_eq!((estimate.untied_calls, estimate.untied_us), (100, 7_000_000));
        assert!((estimate.untied_share - 0.875).abs() < 1e-9, "{}", estimate.untied_share);
        let own = estimated.compared.iter().find(|c| c.via.is_none()).unwrap();
        // 80 ms less 7/8 of it, within the histogram's bucket width.
        assert!((9_000..=11_000).contains(&own.us), "own wait {} µs", own.us);
        assert!(estimated.reason.contains("estimated for the window: 100 calls"), "{}", estimated.reason);
        let wire = estimated.to_proto().evidence.unwrap().local_wait_estimate.unwrap();
        assert_eq!((wire.untied_calls, wire.untied_us), (100, 7_000_000));
        // The service's own slowness still shows through the estimate.
        let mut slow_itself = window(190_000, 180_000, 1_000);
        edge(&mut slow_itself, "b", 500, 9_000, local("b"));
        slow_itself.untied_calls = 100;
        slow_itself.untied_us = 100 * 10_000;
        let decision = run(&slow_itself, Some(100), &[], AggregationMode::Max);
        assert_eq!(decision.verdict, Verdict::RootCause, "{}", decision.reason);
        assert!(decision.local_wait_estimate.is_some());
    }

    #[test]
    fn a_larger_remote_wait_delegates_to_every_callee_it_is_reached_through() {
        // A diamond: d is slow, reached through b and c.
        let mut stats = window(90_000, 1_000, 500);
        edge(&mut stats, "b", 500, 80_000, local("d"));
        edge(&mut stats, "c", 500, 78_000, local("d"));
        edge(&mut stats, "e", 500, 2_000, local("e"));
        let decision = run(&stats, Some(100), &[], AggregationMode::Max);
        assert_eq!(decision.verdict, Verdict::Delegated);
        assert_eq!(decision.delegated_to, vec![Arc::from("b"), Arc::from("c")]);
        assert_eq!(decision.bottleneck, Some(local("d")));
    }

    #[test]
    fn a_bottleneck_is_followed_through_a_branch_with_a_quarter_of_its_wait_not_less() {
        // Histogram buckets round values: clear of the quarter (20 ms) on either side.
        for (c_wait, delegated) in [(30_000, vec!["b", "c"]), (15_000, vec!["b"])] {
            let mut stats = window(90_000, 1_000, 500);
            edge(&mut stats, "b", 500, 80_000, local("d"));
            edge(&mut stats, "c", 500, c_wait, local("d"));
            let decision = run(&stats, Some(100), &[], AggregationMode::Max);
            let delegated: Vec<Arc<str>> = delegated.into_iter().map(Arc::from).collect();
            assert_eq!((decision.verdict, decision.delegated_to), (Verdict::Delegated, delegated), "c at {c_wait}");
        }
    }

    #[test]
    fn a_slow_link_is_a_network_verdict() {
        let mut stats = window(90_000, 1_000, 500);
        edge(&mut stats, "b", 70_000, 5_000, local("b"));
        let decision = run(&stats, Some(100), &[], AggregationMode::Max);
        assert_eq!(decision.verdict, Verdict::Network);
        assert_eq!(decision.bottleneck, Some(WaitPoint::Net { from: "a".into(), to: "b".into() }));
    }

    #[test]
    fn a_net_wait_with_a_saturated_end_is_that_end_s_cpu() {
        let mut stats = window(90_000, 1_000, 500);
        edge(&mut stats, "b", 70_000, 5_000, local("b"));
        let stale = HashSet::new();
        let busy_callee: HashMap<String, f64> = [("b".to_string(), 1.2)].into();
        let mut input = entry(&stats, &stale, &busy_callee);
        let decision = decide(&input, &PolicyConfig::default());
        assert_eq!((decision.verdict, decision.delegated_to.clone()), (Verdict::Delegated, vec![Arc::from("b")]));
        let nobody_busy = HashMap::new();
        input.neighbor_cpu = &nobody_busy;
        input.cpu_utilization = 1.3;
        let decision = decide(&input, &PolicyConfig::default());
        assert_eq!((decision.verdict, decision.kind), (Verdict::RootCause, Some("cpu")));
    }

    #[test]
    fn a_delegation_triggers_a_service_without_an_slo() {
        let stats = window(50_000, 45_000, 1_000);
        let delegation =
            Delegated { from: "entry".into(), percentile: 95.0, path: vec!["entry".into()], unserved_ratio: 1.0 };
        assert_eq!(run(&stats, None, &[], AggregationMode::Max).verdict, Verdict::Healthy);
        assert_eq!(run(&stats, None, &[delegation], AggregationMode::Max).verdict, Verdict::RootCause);
    }

    #[test]
    fn sum_mode_acts_on_every_large_wait() {
        let mut stats = window(90_000, 1_000, 500);
        edge(&mut stats, "b", 500, 80_000, local("b"));
        edge(&mut stats, "c", 500, 60_000, local("c"));
        edge(&mut stats, "e", 500, 2_000, local("e"));
        assert_eq!(run(&stats, Some(100), &[], AggregationMode::Max).delegated_to, vec![Arc::from("b")]);
        let decision = run(&stats, Some(100), &[], AggregationMode::Sum);
        assert_eq!(decision.verdict, Verdict::Delegated);
        assert_eq!(decision.delegated_to, vec![Arc::from("b"), Arc::from("c")]);
    }

    #[test]
    fn too_few_requests_or_a_stale_callee_is_insufficient_data() {
        let mut stats = window(90_000, 1_000, 500);
        edge(&mut stats, "b", 500, 80_000, local("b"));
        let mut few = stats.clone();
        few.requests = 3;
        assert_eq!(run(&few, Some(100), &[], AggregationMode::Max).verdict, Verdict::InsufficientData);
        let stale: HashSet<String> = ["b".to_string()].into();
        let nobody = HashMap::new();
        let input = entry(&stats, &stale, &nobody);
        let decision = decide(&input, &PolicyConfig::default());
        assert_eq!(decision.verdict, Verdict::InsufficientData);
        assert!(decision.delegated_to.is_empty());
    }

    #[test]
    fn saturated_and_idle_come_from_utilisation_alone() {
        let stats = window(10_000, 1_000, 500);
        let stale = HashSet::new();
        let nobody = HashMap::new();
        let mut input = entry(&stats, &stale, &nobody);
        input.utilization = 0.9;
        assert_eq!(decide(&input, &PolicyConfig::default()).verdict, Verdict::Saturated);
        input.utilization = 0.1;
        input.idle_throughout = true;
        assert_eq!(decide(&input, &PolicyConfig::default()).verdict, Verdict::Idle);
    }

    /// An entry whose workers are held for the whole request: 50 ms queued for one, 10 ms of its own work, 40 ms
    /// in a call to "b".
    fn starved_entry() -> WindowStats {
        let mut stats = window(100_000, 55_000, 5_000);
        stats.pool_wait = histogram(50_000, 100);
        stats.downstream = histogram(40_000, 100);
        edge(&mut stats, "b", 1_000, 39_000, local("b"));
        if let Some(edge) = stats.outbound.get_mut("b") {
            edge.client_total = histogram(40_000, 100);
        }
        stats
    }

    #[test]
    fn a_pool_starved_by_a_callee_under_pressure_delegates_to_it() {
        let stats = starved_entry();
        let (stale, nobody) = (HashSet::new(), HashMap::new());
        let mut input = entry(&stats, &stale, &nobody);
        input.pool_scope = PoolScope::Request;
        let busy_b: HashMap<String, f64> = [("b".to_string(), 1.5)].into();
        input.neighbor_subtree = &busy_b;
        let decision = decide(&input, &PolicyConfig::default());
        assert_eq!((decision.verdict, decision.delegated_to.clone()), (Verdict::Delegated, vec![Arc::from("b")]));
        // b's subtree now carries 39 of the 50 ms queued: 39 + 39 = 78 ms against 55 − 40 = 15 ms of its own.
        let own = decision.compared.iter().find(|c| c.via.is_none()).unwrap();
        assert!((14_000..=16_000).contains(&own.us), "{:?}", decision.compared);
        // The same queue behind a callee that is merely slow is the service's own: its pool is too small.
        let calm_b: HashMap<String, f64> = [("b".to_string(), 0.4)].into();
        input.neighbor_subtree = &calm_b;
        let decision = decide(&input, &PolicyConfig::default());
        assert_eq!((decision.verdict, decision.kind), (Verdict::RootCause, Some("local")));
        // And an async service's queue is always its own.
        input.neighbor_subtree = &busy_b;
        input.pool_scope = PoolScope::Own;
        assert_eq!(decide(&input, &PolicyConfig::default()).verdict, Verdict::RootCause);
    }

    #[test]
    fn a_full_pool_held_by_a_callee_under_pressure_is_not_saturated() {
        let stats = starved_entry();
        let (stale, nobody) = (HashSet::new(), HashMap::new());
        let mut input = entry(&stats, &stale, &nobody);
        input.slo = None;
        input.utilization = 1.6;
        input.pool_scope = PoolScope::Request;
        let busy_b: HashMap<String, f64> = [("b".to_string(), 1.5)].into();
        input.neighbor_subtree = &busy_b;
        let decision = decide(&input, &PolicyConfig::default());
        assert_eq!((decision.verdict, decision.delegated_to.clone()), (Verdict::Delegated, vec![Arc::from("b")]));
        input.neighbor_subtree = &NO_PRESSURE;
        assert_eq!(decide(&input, &PolicyConfig::default()).verdict, Verdict::Saturated);
    }
}
