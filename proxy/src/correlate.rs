//! Which inbound request an outbound call belongs to. The application is a black box, so the proxy follows the W3C
//! trace context it propagates (OpenTelemetry SDKs and many frameworks do): every inbound request is registered
//! under its trace id while it is open, and is told apart from others of the same trace (a diamond's two calls
//! into one service, a retry) by a `rootscale=<seq>` member the proxy adds to its `tracestate`. An outbound call
//! carrying that context is counted toward the request; one without it is forwarded and counted as uncorrelated.
//!
//! The map is sharded (no lock shared by all requests) and bounded: when it is full, requests are forwarded
//! unregistered.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use http::{HeaderMap, HeaderValue};
use rootscale_tracer::RequestHandle;

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C vendor state header.
pub const TRACESTATE: &str = "tracestate";
/// The proxy's member of `tracestate`.
const MEMBER: &str = "rootscale";
/// Members `tracestate` may have (W3C).
const MAX_MEMBERS: usize = 32;
/// The longest `tracestate` kept; a longer one is replaced by the proxy's member alone.
const MAX_TRACESTATE: usize = 512;
const SHARDS: usize = 16;

/// A parsed `traceparent`: `00-<trace id>-<parent id>-<flags>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_id: u64,
    pub flags: u8,
}

impl TraceParent {
    /// Strictly: version 00, lowercase hex of the right lengths, ids not all zero.
    pub fn parse(value: &HeaderValue) -> Option<Self> {
        let text = value.to_str().ok()?;
        let mut parts = text.split('-');
        let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let lower_hex =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if parts.next().is_some()
            || version != "00"
            || !lower_hex(trace, 32)
            || !lower_hex(parent, 16)
            || !lower_hex(flags, 2)
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let parent_id = u64::from_str_radix(parent, 16).ok()?;
        (trace_id != 0 && parent_id != 0).then_some(Self {
            trace_id,
            parent_id,
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    pub fn to_header(self) -> HeaderValue {
        let text = format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.parent_id, self.flags);
        // Only hex digits and dashes.
        HeaderValue::from_str(&text)
            .unwrap_or(HeaderValue::from_static("00-00000000000000000000000000000001-0000000000000001-00"))
    }
}

/// Makes trace and span ids for requests that came without a trace context: random per process, then a counter
/// through the process's hasher, so no two are alike and none costs a system call.
#[derive(Debug)]
struct Ids {
    hasher: RandomState,
    next: AtomicU64,
}

impl Ids {
    fn next(&self) -> u64 {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.hasher.hash_one(n).max(1)
    }
}

/// An outbound call's request, as its trace context says.
#[derive(Clone)]
pub enum Lookup {
    Found(RequestHandle),
    /// More than one open request has the trace id, and the call does not say which.
    Ambiguous,
    /// No trace context, or one this proxy never registered.
    Unknown,
    /// The trace context of a request this proxy registered that has ended (abandoned by its caller, or answered
    /// before the application called): the call's time is in no request's wait.
    Ended,
}

/// One shard of the map: the open requests of each trace id, with their sequence numbers.
type Shard = Mutex<HashMap<u128, Vec<(u64, RequestHandle)>>>;

/// The open inbound requests by trace id.
pub struct Correlator {
    shards: Vec<Shard>,
    open: AtomicUsize,
    max_open: usize,
    next_seq: AtomicU64,
    ids: Ids,
}

impl Correlator {
    pub fn new(max_open: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            open: AtomicUsize::new(0),
            max_open: max_open.max(1),
            next_seq: AtomicU64::new(1),
            ids: Ids { hasher: RandomState::new(), next: AtomicU64::new(1) },
        }
    }

    fn shard(&self, trace_id: u128) -> &Shard {
        &self.shards[(trace_id as usize) % SHARDS]
    }

    /// Registers an inbound request with headers `headers` (given a trace context if it had none, and the proxy's
    /// `tracestate` member), until the returned registration is dropped. `None` when the map is full: the
    /// request goes on unregistered.
    pub fn register(self: &Arc<Self>, headers: &mut HeaderMap, request: RequestHandle) -> Option<Registration> {
        let trace = match headers.get(TRACEPARENT).and_then(TraceParent::parse) {
            Some(trace) => trace,
            None => {
                let trace_id = (u128::from(self.ids.next()) << 64) | u128::from(self.ids.next());
                let trace = TraceParent { trace_id, parent_id: self.ids.next(), flags: 0 };
                headers.insert(TRACEPARENT, trace.to_header());
                headers.remove(TRACESTATE);
                trace
            }
        };
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_open {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.shard(trace.trace_id)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(trace.trace_id)
            .or_default()
            .push((seq, request));
        headers.insert(TRACESTATE, with_member(headers.get(TRACESTATE), seq));
        Some(Registration { correlator: self.clone(), trace_id: trace.trace_id, seq })
    }

    /// The open request an outbound call with `headers` belongs to; the proxy's `tracestate` member is taken out
    /// of them (it is for this proxy only).
    pub fn find(&self, headers: &mut HeaderMap) -> Lookup {
        let seq = headers.get(TRACESTATE).and_then(member);
        if let Some(state) = headers.get(TRACESTATE) {
            match without_member(state) {
                Some(rest) => {
                    headers.insert(TRACESTATE, rest);
                }
                None => {
                    headers.remove(TRACESTATE);
                }
            }
        }
        let Some(trace) = headers.get(TRACEPARENT).and_then(TraceParent::parse) else { return Lookup::Unknown };
        let shard = self.shard(trace.trace_id).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // The proxy's own member names a request it registered: if that is not open, it has ended.
        let gone = if seq.is_some() { Lookup::Ended } else { Lookup::Unknown };
        let Some(open) = shard.get(&trace.trace_id) else { return gone };
        match (seq, open.as_slice()) {
            (Some(seq), open) => open.iter().find(|(s, _)| *s == seq).map_or(gone, |(_, h)| Lookup::Found(h.clone())),
            (None, [(_, handle)]) => Lookup::Found(handle.clone()),
            (None, []) => Lookup::Unknown,
            (None, _) => Lookup::Ambiguous,
        }
    }

    /// Inbound requests open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn remove(&self, trace_id: u128, seq: u64) {
        let mut shard = self.shard(trace_id).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(open) = shard.get_mut(&trace_id) {
            open.retain(|(s, _)| *s != seq);
            if open.is_empty() {
                shard.remove(&trace_id);
            }
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An inbound request's place in the map, given up when dropped (its response ended, or was abandoned).
pub struct Registration {
    correlator: Arc<Correlator>,
    trace_id: u128,
    seq: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.correlator.remove(self.trace_id, self.seq);
    }
}

/// The members of a `tracestate` other than the proxy's, if it is usable.
fn other_members(state: Option<&HeaderValue>) -> Vec<&str> {
    let Some(text) = state.and_then(|state| state.to_str().ok()).filter(|text| text.len() <= MAX_TRACESTATE) else {
        return Vec::new();
    };
    text.split(',')
        .map(str::trim)
        .filter(|member| !member.is_empty() && member.split_once('=').is_none_or(|(key, _)| key != MEMBER))
        .collect()
}

fn with_member(state: Option<&HeaderValue>, seq: u64) -> HeaderValue {
    let mut members = vec![format!("{MEMBER}={seq:x}")];
    members.extend(other_members(state).into_iter().take(MAX_MEMBERS - 1).map(str::to_string));
    HeaderValue::from_str(&members.join(",")).unwrap_or_else(|_| HeaderValue::from_static("rootscale=0"))
}

fn without_member(state: &HeaderValue) -> Option<HeaderValue> {
    let rest = other_members(Some(state));
    (!rest.is_empty()).then(|| HeaderValue::from_str(&rest.join(",")).ok()).flatten()
}

fn member(state: &HeaderValue) -> Option<u64> {
    state.to_str().ok()?.split(',').find_map(|member| {
        let (key, value) = member.trim().split_once('=')?;
        (key == MEMBER && value.len() <= 16).then(|| u64::from_str_radix(value, 16).ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> HeaderValue {
        HeaderValue::from_str(text).unwrap()
    }

    #[test]
    fn traceparent_is_parsed_strictly() {
        let good = TraceParent::parse(&value("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")).unwrap();
        assert_eq!(good.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(TraceParent::parse(&good.to_header()), Some(good));
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
            "garbage",
        ] {
            assert_eq!(TraceParent::parse(&value(bad)), None, "{bad}");
        }
    }

    #[test]
    fn a_call_finds_its_request_by_trace_and_member_and_the_member_goes_no_further() {
        let correlator = Arc::new(Correlator::new(8));
        let mut first = HeaderMap::new();
        first.insert(TRACEPARENT, value("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        first.insert(TRACESTATE, value("vendor=x,rootscale=ff"));
        let registration = correlator.register(&mut first, RequestHandle::current()).unwrap();
        // The member is replaced by this request's, the other vendors' kept.
        let state = first.get(TRACESTATE).unwrap().to_str().unwrap().to_string();
        assert_eq!(state, format!("rootscale={:x},vendor=x", registration.seq));
        // A second request of the same trace (a diamond's other branch).
        let mut second = first.clone();
        second.remove(TRACESTATE);
        let other = correlator.register(&mut second, RequestHandle::current()).unwrap();
        assert_eq!(correlator.open(), 2);
        // The application propagated both headers: the member says which request.
        let mut call = first.clone();
        assert!(matches!(correlator.find(&mut call), Lookup::Found(_)));
        assert_eq!(call.get(TRACESTATE).unwrap(), "vendor=x", "the member stays here");
        // Without the member, two open requests of one trace are ambiguous.
        assert!(matches!(correlator.find(&mut call), Lookup::Ambiguous));
        drop(other);
        assert!(matches!(correlator.find(&mut call.clone()), Lookup::Found(_)), "one left: it is that one");
        drop(registration);
        assert!(matches!(correlator.find(&mut call), Lookup::Unknown), "no member, no open request");
        // With the member of a request that has ended: made after it, in no request's wait.
        assert!(matches!(correlator.find(&mut first.clone()), Lookup::Ended));
        let mut foreign = first.clone();
        foreign.remove(TRACESTATE);
        assert!(matches!(correlator.find(&mut foreign), Lookup::Unknown), "a context this proxy never saw");
        assert_eq!(correlator.open(), 0);
    }

    #[test]
    fn a_request_without_context_gets_one_and_a_full_map_registers_nothing() {
        let correlator = Arc::new(Correlator::new(1));
        let mut headers = HeaderMap::new();
        let kept = correlator.register(&mut headers, RequestHandle::current()).unwrap();
        assert!(TraceParent::parse(headers.get(TRACEPARENT).unwrap()).is_some());
        let mut another = HeaderMap::new();
        assert!(correlator.register(&mut another, RequestHandle::current()).is_none(), "the map is full");
        drop(kept);
        assert_eq!(correlator.open(), 0);
        let mut oversized = HeaderMap::new();
        oversized.insert(TRACESTATE, value(&"a=b,".repeat(200)));
        let _registered = correlator.register(&mut oversized, RequestHandle::current()).unwrap();
        assert!(oversized.get(TRACESTATE).unwrap().to_str().unwrap().starts_with("rootscale="));
        assert!(oversized.get(TRACESTATE).unwrap().len() < 32);
    }
}
