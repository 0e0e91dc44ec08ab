//! What one request and one outbound call measured: the values docs/DESIGN.md §1.1 defines.

use std::{sync::Arc, time::Duration};

/// Where a wait happened.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WaitPoint {
    /// Inside `service`: its CPU, a pool, a lock, an un-instrumented dependency.
    Local { service: Arc<str> },
    /// On the link from `from` to `to` (connection set-up and transfer).
    Net { from: Arc<str>, to: Arc<str> },
}

impl WaitPoint {
    /// The service this wait points at (the callee, for a link).
    pub fn service(&self) -> &str {
        match self {
            WaitPoint::Local { service } => service,
            WaitPoint::Net { to, .. } => to,
        }
    }
}

impl std::fmt::Display for WaitPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitPoint::Local { service } => write!(f, "{service} (local)"),
            WaitPoint::Net { from, to } => write!(f, "{from}>{to} (net)"),
        }
    }
}

/// A wait of `us` microseconds at `point`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wait {
    pub point: WaitPoint,
    pub us: u64,
}

impl Wait {
    /// The larger of two waits; on a tie the first is kept.
    pub fn max(self, other: Wait) -> Wait {
        if other.us > self.us { other } else { self }
    }
}

/// One request handled by this service, measured by the server layer.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// The caller service, from `rootscale-caller`; `None` for requests from outside the graph.
    pub caller: Option<String>,
    /// From when the server layer was handed the request until its response body ended or was dropped, less the
    /// time the server spent writing body frames out.
    pub total: Duration,
    /// Time inside `poll` of the handler's future.
    pub busy: Duration,
    /// Time the handler's future was woken but not yet polled.
    pub cpu_wait: Duration,
    /// Wall time during which at least one outbound call for this request was in flight.
    pub downstream: Duration,
    /// `total - downstream - busy` (busy time while calls were in flight counted once): waiting that is this
    /// service's own, including `cpu_wait`.
    pub local_wait: Duration,
    /// The part of `local_wait` spent queued for a worker of the service's pool, as the service recorded it with
    /// [`crate::RequestHandle::record_pool_wait`].
    pub pool_wait: Duration,
    /// The largest wait in this request's subtree when the request ended.
    pub largest_wait: Wait,
    /// A server error: 5xx, or a gRPC status meaning the server failed (UNKNOWN, DEADLINE_EXCEEDED,
    /// UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS).
    pub error: bool,
    /// Abandoned before the response ended: the client went away or a timeout fired.
    pub cancelled: bool,
    /// How many requests this one stands for in its window (1 unless sampling: see [`crate::SampleRate`]).
    pub weight: u32,
}

/// One outbound call made by this service, measured by the client layer or [`crate::downstream`].
#[derive(Clone, Debug)]
pub struct CallRecord {
    /// The callee (from its timing header, else the name given to the layer, else the URI authority).
    pub callee: Arc<str>,
    /// From before the call until the full response is in (or the call failed or was dropped).
    pub client_total: Duration,
    /// The callee's own `total`, if its timing header said.
    pub remote_total: Option<Duration>,
    /// `client_total - remote_total`: connection set-up and transfer.
    pub net_wait: Option<Duration>,
    /// The largest wait in the callee's subtree (all of `client_total`, for a callee that did not say).
    pub remote_wait: Wait,
    /// Last to finish in its group of overlapping calls, so on the request's critical path.
    pub critical: bool,
    /// Transport error, 5xx, or a gRPC status meaning the server failed.
    pub error: bool,
    /// The response carried a `rootscale-timing` that could not be parsed.
    pub malformed_timing: bool,
    /// How many calls this one stands for in its window (its request's weight).
    pub weight: u32,
}

/// Nanoseconds, saturating (avoids the u128 of `Duration::as_nanos`).
pub(crate) fn nanos(duration: Duration) -> u64 {
    duration.as_secs().saturating_mul(1_000_000_000).saturating_add(u64::from(duration.subsec_nanos()))
}

/// Whole microseconds, saturating (avoids the u128 arithmetic of `Duration::as_micros` on the request path).
pub(crate) fn micros(duration: Duration) -> u64 {
    duration.as_secs().saturating_mul(1_000_000).saturating_add(u64::from(duration.subsec_micros()))
}
