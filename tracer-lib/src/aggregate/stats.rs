//! One window's statistics for one service: the per-service distributions and the per-edge ones, with a hard cap
//! on edges. Shards on the request path fill one each; closing a window merges them and keeps the busiest edges.

use std::sync::Arc;

use rootscale_proto::v1 as proto;
use rustc_hash::FxHashMap as HashMap;

use crate::{
    aggregate::histogram::Histogram,
    measure::{headers::WaitPointRef, record::WaitPoint},
};

/// Agent addresses kept per edge: one per replica of the neighbour, up to this many.
pub const AGENTS_PER_EDGE: usize = 8;
/// Callers beyond the edge cap whose agents a window still keeps (names and addresses only, no measurements), so
/// that its reports reach every caller: a caller whose workers wait on this service must hear its pressure
/// (docs/DESIGN.md §1.7), however many callers a shared service has.
pub const MAX_CALLERS_BEYOND_CAP: usize = 1024;
/// Wait points kept per outbound edge: the first this many seen in a window; later ones are left out of the list
/// (their waits still count in `remote_wait`).
pub const WAIT_POINTS_PER_EDGE: usize = 4;

/// Adds `agent` to a bounded list of agent addresses.
fn note_agent(agents: &mut Vec<Box<str>>, agent: &str) {
    if agents.len() < AGENTS_PER_EDGE && !agents.iter().any(|known| &**known == agent) {
        agents.push(agent.into());
    }
}

/// Requests from one caller.
#[derive(Clone, Debug, Default)]
pub struct InboundStats {
    /// The caller's agents (one per replica), as announced in `rootscale-caller`.
    pub caller_agents: Vec<Box<str>>,
    pub requests: u64,
    pub total: Histogram,
}

impl InboundStats {
    fn merge(&mut self, other: &InboundStats) {
        for agent in &other.caller_agents {
            note_agent(&mut self.caller_agents, agent);
        }
        self.requests += other.requests;
        self.total.merge(&other.total);
    }
}

/// Calls to one callee.
#[derive(Clone, Debug, Default)]
pub struct OutboundStats {
    /// The callee's agents (one per replica), as announced in `rootscale-timing`.
    pub callee_agents: Vec<Box<str>>,
    pub calls: u64,
    pub errors: u64,
    pub untimed: u64,
    pub critical: u64,
    pub client_total: Histogram,
    pub remote_total: Histogram,
    pub net_wait: Histogram,
    pub remote_wait: Histogram,
    /// Where the callee's subtree waited: point, count, largest wait.
    pub remote_wait_at: Vec<(WaitPoint, u64, u64)>,
}

impl OutboundStats {
    /// Where the callee's subtree waited most often this window (the largest `max_us` among equals); `None` when
    /// its responses named no point.
    pub fn usual_wait_point(&self) -> Option<&WaitPoint> {
        self.remote_wait_at.iter().max_by_key(|(_, count, max_us)| (*count, *max_us)).map(|(point, _, _)| point)
    }

    fn note_wait_point(&mut self, point: WaitPointRef<'_>, count: u64, max_us: u64) {
        if let Some(entry) = self.remote_wait_at.iter_mut().find(|(known, _, _)| known.as_ref() == point) {
            entry.1 = entry.1.saturating_add(count);
            entry.2 = entry.2.max(max_us);
        } else if self.remote_wait_at.len() < WAIT_POINTS_PER_EDGE {
            self.remote_wait_at.push((point.to_owned(), count, max_us));
        }
    }

    fn merge(&mut self, other: &OutboundStats) {
        for agent in &other.callee_agents {
            note_agent(&mut self.callee_agents, agent);
        }
        self.calls += other.calls;
        self.errors += other.errors;
        self.untimed += other.untimed;
        self.critical += other.critical;
        self.client_total.merge(&other.client_total);
        self.remote_total.merge(&other.remote_total);
        self.net_wait.merge(&other.net_wait);
        self.remote_wait.merge(&other.remote_wait);
        for (point, count, max_us) in &other.remote_wait_at {
            self.note_wait_point(point.as_ref(), *count, *max_us);
        }
    }
}

/// One service's aggregate over one window.
#[derive(Clone, Debug, Default)]
pub struct WindowStats {
    pub window_id: u64,
    /// Requests handed to the server layer while the window was open (set when it closes).
    pub arrivals: u64,
    /// Requests that ended in the window.
    pub requests: u64,
    pub errors: u64,
    pub cancelled: u64,
    pub external_requests: u64,
    pub total: Histogram,
    pub busy: Histogram,
    pub cpu_wait: Histogram,
    pub local_wait: Histogram,
    /// The part of `local_wait` queued for a worker of the service's pool.
    pub pool_wait: Histogram,
    pub downstream: Histogram,
    pub inbound: HashMap<Box<str>, InboundStats>,
    pub outbound: HashMap<Arc<str>, OutboundStats>,
    pub inbound_overflow: u64,
    pub outbound_overflow: u64,
    /// Callers whose edges were not kept (beyond the cap): their agents only, at most [`MAX_CALLERS_BEYOND_CAP`];
    /// while a shard records, first come first kept; on closing, the callers whose edges were trimmed first. Their
    /// requests count in `inbound_overflow`.
    pub callers_beyond_cap: HashMap<Box<str>, Vec<Box<str>>>,
    /// Calls made for a request that could not be named (a sidecar's application that does not pass the trace
    /// context on): their time is in the requests' `local_wait`, not in `downstream`.
    pub untied_calls: u64,
    /// Those calls' `client_total`, summed.
    pub untied_us: u64,
    /// The sampling rate's N: one request from outside in this many was measured, past the window's reservoir
    /// (1: every one). The counts above are already estimates of all requests (each measured one counted by its
    /// weight).
    pub sample_every: u32,
}

/// What the server layer hands to the aggregator for one request.
pub struct RequestSample<'a> {
    pub caller: Option<(&'a str, Option<&'a str>)>,
    pub total_us: u64,
    pub busy_us: u64,
    pub cpu_wait_us: u64,
    pub downstream_us: u64,
    pub local_wait_us: u64,
    pub pool_wait_us: u64,
    pub error: bool,
    pub cancelled: bool,
    /// How many requests this one stands for: 1/the probability it was measured with (1 unless sampling).
    pub weight: u64,
}

/// What the client layer hands to the aggregator for one call.
pub struct CallSample<'a> {
    pub callee: &'a str,
    pub callee_agent: Option<&'a str>,
    pub client_total_us: u64,
    pub remote_total_us: Option<u64>,
    pub net_wait_us: Option<u64>,
    /// The largest wait in the callee's subtree (all of the call, for an un-instrumented callee).
    pub remote_wait: (WaitPointRef<'a>, u64),
    pub critical: bool,
    pub error: bool,
    /// Made for a request the caller could not name (see [`WindowStats::untied_calls`]).
    pub untied: bool,
    /// How many calls this one stands for (see [`RequestSample::weight`]).
    pub weight: u64,
}

impl WindowStats {
    pub fn new(window_id: u64) -> Self {
        Self { window_id, sample_every: 1, ..Self::default() }
    }

    /// Records one request (the server layer's, or a simulator's), counted as its weight; a caller beyond
    /// `edge_cap` edges is counted in `inbound_overflow`, and its agent kept in `callers_beyond_cap`.
    pub fn record_request(&mut self, sample: &RequestSample<'_>, edge_cap: usize) {
        let weight = sample.weight;
        let count = |flag: bool| if flag { weight } else { 0 };
        self.requests = self.requests.saturating_add(weight);
        self.errors = self.errors.saturating_add(count(sample.error));
        self.cancelled = self.cancelled.saturating_add(count(sample.cancelled));
        self.total.record_weighted(sample.total_us, weight);
        self.busy.record_weighted(sample.busy_us, weight);
        self.cpu_wait.record_weighted(sample.cpu_wait_us, weight);
        self.local_wait.record_weighted(sample.local_wait_us, weight);
        self.pool_wait.record_weighted(sample.pool_wait_us, weight);
        self.downstream.record_weighted(sample.downstream_us, weight);
        let Some((caller, caller_agent)) = sample.caller else {
            self.external_requests = self.external_requests.saturating_add(weight);
            return;
        };
        let Some(edge) = capped_entry(&mut self.inbound, caller, edge_cap, || caller.into()) else {
            self.inbound_overflow = self.inbound_overflow.saturating_add(weight);
            if let Some(agent) = caller_agent {
                self.note_caller_beyond_cap(caller, agent);
            }
            return;
        };
        if let Some(agent) = caller_agent {
            note_agent(&mut edge.caller_agents, agent);
        }
        edge.requests = edge.requests.saturating_add(weight);
        edge.total.record_weighted(sample.total_us, weight);
    }

    /// Records one outbound call, counted as its weight; a callee beyond `edge_cap` edges is counted in
    /// `outbound_overflow` only.
    pub fn record_call(&mut self, sample: &CallSample<'_>, edge_cap: usize) {
        let weight = sample.weight;
        let count = |flag: bool| if flag { weight } else { 0 };
        if sample.untied {
            self.untied_calls = self.untied_calls.saturating_add(weight);
            self.untied_us = self.untied_us.saturating_add(sample.client_total_us.saturating_mul(weight));
        }
        let Some(edge) = capped_entry(&mut self.outbound, sample.callee, edge_cap, || sample.callee.into()) else {
            self.outbound_overflow = self.outbound_overflow.saturating_add(weight);
            return;
        };
        if let Some(agent) = sample.callee_agent {
            note_agent(&mut edge.callee_agents, agent);
        }
        edge.calls = edge.calls.saturating_add(weight);
        edge.errors = edge.errors.saturating_add(count(sample.error));
        edge.critical = edge.critical.saturating_add(count(sample.critical));
        edge.client_total.record_weighted(sample.client_total_us, weight);
        match (sample.remote_total_us, sample.net_wait_us) {
            (Some(remote_total), Some(net_wait)) => {
                edge.remote_total.record_weighted(remote_total, weight);
                edge.net_wait.record_weighted(net_wait, weight);
            }
            _ => edge.untimed = edge.untimed.saturating_add(weight),
        }
        let (point, wait_us) = sample.remote_wait;
        edge.remote_wait.record_weighted(wait_us, weight);
        edge.note_wait_point(point, weight, wait_us);
    }

    /// Adds `other` (the same window from another shard), every edge included; [`WindowStats::keep_busiest`]
    /// applies the cap afterwards.
    pub(crate) fn merge(&mut self, other: &WindowStats) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.cancelled += other.cancelled;
        self.external_requests += other.external_requests;
        self.total.merge(&other.total);
        self.busy.merge(&other.busy);
        self.cpu_wait.merge(&other.cpu_wait);
        self.local_wait.merge(&other.local_wait);
        self.pool_wait.merge(&other.pool_wait);
        self.downstream.merge(&other.downstream);
        self.inbound_overflow += other.inbound_overflow;
        self.outbound_overflow += other.outbound_overflow;
        self.untied_calls += other.untied_calls;
        self.untied_us = self.untied_us.saturating_add(other.untied_us);
        for (caller, theirs) in &other.inbound {
            self.inbound.entry(caller.clone()).or_default().merge(theirs);
        }
        for (caller, agents) in &other.callers_beyond_cap {
            for agent in agents {
                self.note_caller_beyond_cap(caller, agent);
            }
        }
        for (callee, theirs) in &other.outbound {
            self.outbound.entry(callee.clone()).or_default().merge(theirs);
        }
    }

    /// The share of the window's `local_wait` that was spent in untied calls (0 when there were none), at most 1.
    /// Subtracting it is the per-window estimate of a service's own wait when its calls cannot be tied to their
    /// requests: exact when each request's calls run one after another, too low a wait when they overlap.
    pub fn untied_share(&self) -> f64 {
        if self.untied_us == 0 {
            return 0.0;
        }
        (self.untied_us as f64 / self.local_wait.sum_us().max(1) as f64).min(1.0)
    }

    /// Keeps the `cap` busiest edges each way and counts the rest as overflow, so names that arrive first (a
    /// flood of spoofed callers early in a window) cannot crowd out real neighbours. The callers trimmed keep their
    /// agents among the callers beyond the cap, busiest first and ahead of names only heard of there.
    pub(crate) fn keep_busiest(&mut self, cap: usize) {
        let trimmed = trim(&mut self.inbound, cap, |edge| edge.requests);
        // A caller whose edge is kept after all (busier in another shard) is told through it.
        let inbound = &self.inbound;
        self.callers_beyond_cap.retain(|caller, _| !inbound.contains_key(caller));
        let heard_of = std::mem::take(&mut self.callers_beyond_cap);
        for (caller, edge) in trimmed {
            self.inbound_overflow += edge.requests;
            for agent in &edge.caller_agents {
                self.note_caller_beyond_cap(&caller, agent);
            }
        }
        let mut heard_of: Vec<_> = heard_of.into_iter().collect();
        heard_of.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (caller, agents) in heard_of {
            for agent in &agents {
                self.note_caller_beyond_cap(&caller, agent);
            }
        }
        self.outbound_overflow +=
            trim(&mut self.outbound, cap, |edge| edge.calls).iter().map(|(_, edge)| edge.calls).sum::<u64>();
    }

    /// Keeps `agent` of `caller`, a caller beyond the edge cap, while there is room.
    fn note_caller_beyond_cap(&mut self, caller: &str, agent: &str) {
        if let Some(agents) = self.callers_beyond_cap.get_mut(caller) {
            note_agent(agents, agent);
        } else if self.callers_beyond_cap.len() < MAX_CALLERS_BEYOND_CAP {
            self.callers_beyond_cap.insert(caller.into(), vec![agent.into()]);
        }
    }

    /// The wire form, edges sorted by name so reports are deterministic.
    pub fn to_proto(&self, service: &str, window_ms: u64) -> proto::ServiceWindow {
        let mut inbound: Vec<_> = self
            .inbound
            .iter()
            .map(|(caller, edge)| proto::InboundEdge {
                caller: caller.to_string(),
                caller_agents: edge.caller_agents.iter().map(|a| a.to_string()).collect(),
                requests: edge.requests,
                total: Some(edge.total.to_proto()),
            })
            .collect();
        inbound.sort_by(|a, b| a.caller.cmp(&b.caller));
        let mut outbound: Vec<_> = self.outbound.iter().map(|(callee, edge)| outbound_to_proto(callee, edge)).collect();
        outbound.sort_by(|a, b| a.callee.cmp(&b.callee));
        proto::ServiceWindow {
            service: service.to_string(),
            window_id: self.window_id,
            window_ms: u32::try_from(window_ms).unwrap_or(u32::MAX),
            requests: self.requests,
            arrivals: self.arrivals,
            errors: self.errors,
            cancelled: self.cancelled,
            external_requests: self.external_requests,
            total: Some(self.total.to_proto()),
            busy: Some(self.busy.to_proto()),
            cpu_wait: Some(self.cpu_wait.to_proto()),
            local_wait: Some(self.local_wait.to_proto()),
            pool_wait: Some(self.pool_wait.to_proto()),
            downstream: Some(self.downstream.to_proto()),
            inbound,
            outbound,
            inbound_overflow: self.inbound_overflow,
            outbound_overflow: self.outbound_overflow,
            untied_calls: self.untied_calls,
            untied_us: self.untied_us,
        }
    }
}

/// Removes all but the `cap` entries with the largest `count` (ties by name); returns the removed entries, busiest
/// first.
fn trim<K: Ord + Clone + std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, V>,
    cap: usize,
    count: impl Fn(&V) -> u64,
) -> Vec<(K, V)> {
    if map.len() <= cap {
        return Vec::new();
    }
    let mut ranked: Vec<(u64, K)> = map.iter().map(|(key, value)| (count(value), key.clone())).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    ranked.drain(cap..).filter_map(|(_, key)| map.remove_entry(&key)).collect()
}

/// The entry for `key`, created if the map holds fewer than `cap` entries; `None` when it is full.
fn capped_entry<'m, K, V>(
    map: &'m mut HashMap<K, V>,
    key: &str,
    cap: usize,
    make_key: impl FnOnce() -> K,
) -> Option<&'m mut V>
where
    K: std::borrow::Borrow<str> + std::hash::Hash + Eq,
    V: Default,
{
    if !map.contains_key(key) {
        if map.len() >= cap {
            return None;
        }
        map.insert(make_key(), V::default());
    }
    map.get_mut(key)
}

/// The wire form of one wait point.
pub fn wait_point_to_proto(point: &WaitPoint) -> proto::WaitPoint {
    match point {
        WaitPoint::Local { service } => proto::WaitPoint {
            service: service.to_string(),
            from_service: String::new(),
            kind: proto::WaitKind::Local as i32,
        },
        WaitPoint::Net { from, to } => proto::WaitPoint {
            service: to.to_string(),
            from_service: from.to_string(),
            kind: proto::WaitKind::Net as i32,
        },
    }
}

fn outbound_to_proto(callee: &str, edge: &OutboundStats) -> proto::OutboundEdge {
    let mut remote_wait_at: Vec<_> = edge
        .remote_wait_at
        .iter()
        .map(|(point, count, max_us)| proto::WaitPointCount {
            point: Some(wait_point_to_proto(point)),
            count: *count,
            max_us: *max_us,
        })
        .collect();
    remote_wait_at.sort_by_key(|entry| std::cmp::Reverse(entry.count));
    proto::OutboundEdge {
        callee: callee.to_string(),
        callee_agents: edge.callee_agents.iter().map(|a| a.to_string()).collect(),
        calls: edge.calls,
        errors: edge.errors,
        untimed: edge.untimed,
        critical: edge.critical,
        client_total: Some(edge.client_total.to_proto()),
        remote_total: Some(edge.remote_total.to_proto()),
        net_wait: Some(edge.net_wait.to_proto()),
        remote_wait: Some(edge.remote_wait.to_proto()),
        remote_wait_at,
    }
}
