//! The [`Tracer`]: one per service. It holds the service's identity, its window aggregator and counters, and
//! hands out the layers that measure requests and calls. Cheap to clone.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::HeaderValue;
use tokio::sync::watch;

use crate::{
    Error,
    aggregate::{Aggregator, WindowClock, WindowStats},
    identity::{
        HeaderRole, KeyRing, Membership, Rejection, RejectionCounts,
        believed::{self, Reader},
    },
    measure::{
        client::ClientLayer,
        downstream::Dependency,
        headers::{CallerHeader, HeaderError, Timing, TimingEncoder, valid_agent_addr, valid_service_name},
        record::{CallRecord, RequestRecord, WaitPoint},
        sample::{Reservoir, SAMPLE_RESERVOIR, SampleRate},
        server::ServerLayer,
    },
};

const NONE_CLOSED: u64 = u64::MAX;

/// Default window length.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(5);
/// Default cap on edges kept per direction per window.
pub const DEFAULT_EDGE_CAP: usize = 64;

/// Sees every request and call as it is recorded. For tests, debugging and exporters; keep it cheap, it runs on
/// the request path.
pub trait Observer: Send + Sync + 'static {
    fn on_request(&self, _record: &RequestRecord) {}
    fn on_call(&self, _record: &CallRecord) {}
}

/// A closed window of one service.
#[derive(Debug)]
pub struct ClosedWindow {
    pub service: Arc<str>,
    pub window_ms: u64,
    pub stats: WindowStats,
}

impl ClosedWindow {
    pub fn to_proto(&self) -> rootscale_proto::v1::ServiceWindow {
        self.stats.to_proto(&self.service, self.window_ms)
    }
}

/// Bad input seen on the request path, counted (never returned to anyone).
#[derive(Debug, Default)]
pub struct Counters {
    pub malformed_caller: AtomicU64,
    pub malformed_timing: AtomicU64,
}

pub(crate) struct Shared {
    pub(crate) service: Arc<str>,
    pub(crate) agent: Option<Arc<str>>,
    /// The caller header without a proof (no mesh key).
    caller_header: HeaderValue,
    /// The same, for requests left out of the sample.
    unsampled_caller_header: HeaderValue,
    /// The same, for requests drawn here at 1/N (`w=N`).
    weighted_caller_header: HeaderValue,
    /// The window's requests from outside measured before the rate applies.
    pub(crate) reservoir: Reservoir,
    /// Which requests are measured.
    pub(crate) sample: SampleRate,
    /// Tells the headers this tracer believed from other tracers' on the same thread.
    reader_id: u64,
    pub(crate) timing_encoder: TimingEncoder,
    /// With a mesh key: the proofs this service makes and checks.
    pub(crate) membership: Option<Membership>,
    pub(crate) local_point: WaitPoint,
    pub(crate) aggregator: Aggregator,
    pub(crate) counters: Counters,
    pub(crate) observer: Option<Arc<dyn Observer>>,
    pub(crate) timing_for_everyone: bool,
    /// The last window closed ([`NONE_CLOSED`] before the first).
    closed_through: AtomicU64,
    windows: watch::Sender<Option<Arc<ClosedWindow>>>,
}

/// A service's measurement core.
#[derive(Clone)]
pub struct Tracer {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").field("service", &self.shared.service).field("agent", &self.shared.agent).finish()
    }
}

/// Builds a [`Tracer`].
pub struct TracerBuilder {
    service: String,
    agent: Option<String>,
    window: Duration,
    edge_cap: usize,
    observer: Option<Arc<dyn Observer>>,
    timing_for_everyone: bool,
    keys: Option<Arc<KeyRing>>,
    sample: SampleRate,
}

impl TracerBuilder {
    /// The mesh key (docs/DESIGN.md §1.6): headers carry a proof made with it, and only headers whose proof
    /// verifies are believed; the rest is outside traffic. Without it every well-formed header is believed. Proofs
    /// are for the window the window closer last began, so [`Tracer::run_window_closer`] must run (the agent runs
    /// it): without it the proofs go stale after a window.
    pub fn mesh_keys(mut self, keys: Arc<KeyRing>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// The address (`host:port`) of this service's agent, announced to neighbours in the in-band headers.
    pub fn agent_addr(mut self, addr: impl Into<String>) -> Self {
        self.agent = Some(addr.into());
        self
    }

    /// Window length (default 5 s). Neighbours must use the same length for their windows to line up.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Most edges kept per direction per window (default 64); the rest are counted as overflow.
    pub fn edge_cap(mut self, cap: usize) -> Self {
        self.edge_cap = cap;
        self
    }

    /// Send `rootscale-timing` to every caller, not only to instrumented ones (default off: an entry service keeps
    /// its internal service names and timings from outside clients). Useful for debugging with `curl -i`.
    pub fn timing_for_everyone(mut self, enabled: bool) -> Self {
        self.timing_for_everyone = enabled;
        self
    }

    /// Measure a reservoir of requests each window and one in N of the rest (default: every one). A service
    /// measures the requests its instrumented callers measured, with the weight they were chosen with, so its
    /// counts stay unbiased whatever rate its callers use (see [`crate::measure::sample`]).
    pub fn sample(mut self, rate: SampleRate) -> Self {
        self.sample = rate;
        self
    }

    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn build(self) -> Result<Tracer, Error> {
        if !valid_service_name(&self.service) {
            return Err(Error::InvalidServiceName(self.service));
        }
        if let Some(agent) = &self.agent
            && !valid_agent_addr(agent)
        {
            return Err(Error::InvalidAgentAddress(agent.clone()));
        }
        if self.window < Duration::from_millis(100) || self.window > Duration::from_secs(3600) {
            return Err(Error::InvalidWindow(self.window));
        }
        if self.edge_cap == 0 || self.edge_cap > 4096 {
            return Err(Error::InvalidEdgeCap(self.edge_cap));
        }
        crate::measure::clock::calibrate();
        let service: Arc<str> = self.service.into();
        let agent: Option<Arc<str>> = self.agent.map(Into::into);
        let (windows, _) = watch::channel(None);
        let clock = WindowClock::new(self.window);
        Ok(Tracer {
            shared: Arc::new(Shared {
                membership: self.keys.map(|keys| {
                    Membership::new(
                        keys,
                        service.clone(),
                        agent.clone(),
                        clock.window_id(Instant::now()),
                        self.sample.every(),
                    )
                }),
                caller_header: CallerHeader::encode(&service, agent.as_deref()),
                unsampled_caller_header: CallerHeader::encode_with_proof(&service, agent.as_deref(), "", None),
                weighted_caller_header: CallerHeader::encode_with_proof(
                    &service,
                    agent.as_deref(),
                    "",
                    Some(self.sample.every()),
                ),
                reservoir: Reservoir::default(),
                sample: self.sample,
                reader_id: believed::new_reader_id(),
                timing_encoder: TimingEncoder::new(&service, agent.as_deref()),
                local_point: WaitPoint::Local { service: service.clone() },
                service,
                agent,
                aggregator: Aggregator::new(clock, self.edge_cap, self.sample),
                counters: Counters::default(),
                observer: self.observer,
                timing_for_everyone: self.timing_for_everyone,
                closed_through: AtomicU64::new(NONE_CLOSED),
                windows,
            }),
        })
    }
}

impl Tracer {
    /// Starts building the tracer of `service`.
    pub fn builder(service: impl Into<String>) -> TracerBuilder {
        TracerBuilder {
            service: service.into(),
            agent: None,
            window: DEFAULT_WINDOW,
            edge_cap: DEFAULT_EDGE_CAP,
            observer: None,
            timing_for_everyone: false,
            sample: SampleRate::ALL,
            keys: None,
        }
    }

    pub fn service(&self) -> &str {
        &self.shared.service
    }

    pub fn agent_addr(&self) -> Option<&str> {
        self.shared.agent.as_deref()
    }

    pub fn window_clock(&self) -> &WindowClock {
        self.shared.aggregator.clock()
    }

    /// The server layer: put it outermost on an axum `Router`, a tonic `Server` or any hyper service.
    pub fn server_layer(&self) -> ServerLayer {
        ServerLayer::new(self.clone())
    }

    /// The client layer: put it on a tonic `Channel`, a hyper-util `Client` or any HTTP `Service`.
    pub fn client_layer(&self) -> ClientLayer {
        ClientLayer::new(self.clone())
    }

    /// A non-HTTP dependency (a database, a cache) whose calls should count as downstream time.
    pub fn dependency(&self, name: &str) -> Result<Dependency, Error> {
        if !valid_service_name(name) {
            return Err(Error::InvalidServiceName(name.to_string()));
        }
        Ok(Dependency::new(self.clone(), name.into()))
    }

    /// Bad headers counted so far.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Records lost because their window was closed, or never closed.
    pub fn losses(&self) -> &crate::aggregate::Losses {
        self.shared.aggregator.losses()
    }

    /// Closes `window_id` (and every earlier one), publishes it to subscribers and returns it.
    ///
    /// Returns `None`, closing nothing, for a window that was already closed (or an earlier one) or has not begun.
    /// Closing the current window ends it early: requests that end in it later are counted as late.
    pub fn close_window(&self, window_id: u64) -> Option<Arc<ClosedWindow>> {
        if window_id > self.window_clock().window_id(Instant::now()) {
            return None;
        }
        let claimed = self.shared.closed_through.fetch_update(Ordering::AcqRel, Ordering::Acquire, |closed| {
            (closed == NONE_CLOSED || window_id > closed).then_some(window_id)
        });
        if claimed.is_err() {
            return None;
        }
        if let Some(membership) = &self.shared.membership {
            membership.window_began(window_id.saturating_add(1));
        }
        let closed = Arc::new(ClosedWindow {
            service: self.shared.service.clone(),
            window_ms: self.window_clock().window_ms(),
            stats: self.shared.aggregator.close(window_id),
        });
        self.shared.windows.send_replace(Some(closed.clone()));
        Some(closed)
    }

    /// Closes each window shortly after it ends, forever. Spawn it once per service (the agent does).
    pub fn run_window_closer(&self) -> impl Future<Output = ()> + Send + 'static {
        let tracer = self.clone();
        async move {
            let clock = tracer.window_clock().clone();
            // Records are made the instant a request ends; a short grace lets ones racing the boundary land.
            let grace = Duration::from_millis((clock.window_ms() / 20).clamp(5, 100));
            let mut window_id = clock.window_id(Instant::now());
            loop {
                let Some(close_at) = clock.window_end(window_id).and_then(|end| end.checked_add(grace)) else {
                    return; // window ids beyond what the clock can represent: nothing left to close
                };
                tokio::time::sleep_until(close_at.into()).await;
                tracer.close_window(window_id);
                window_id += 1;
                // After a long stall (a suspended process), skip to the present instead of closing empty windows.
                let now_window = clock.window_id(Instant::now());
                if now_window > window_id + 1 {
                    window_id = now_window - 1;
                }
            }
        }
    }

    /// Each window as it closes.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<ClosedWindow>>> {
        self.shared.windows.subscribe()
    }

    /// The last closed window, if any.
    pub fn last_window(&self) -> Option<Arc<ClosedWindow>> {
        self.shared.windows.borrow().clone()
    }

    /// Headers refused as outside traffic, by header and reason (`None` without a mesh key).
    pub fn rejections(&self) -> Option<&RejectionCounts> {
        self.shared.membership.as_ref().map(|membership| &membership.rejections)
    }

    /// Reads the mesh key file again (the agent does, each window); true when the keys changed.
    pub fn reload_keys(&self) -> Result<bool, Error> {
        match &self.shared.membership {
            Some(membership) => membership.reload_keys(),
            None => Ok(false),
        }
    }

    /// The window a request or call proves its membership for, and received proofs are checked against (0
    /// without a mesh key). Kept by the window closer, so the request path reads an atomic instead of the clock;
    /// it trails the clock by the closer's grace, and by more when the closer is held up.
    pub fn proof_window(&self) -> u64 {
        self.shared.membership.as_ref().map_or(0, Membership::current_window)
    }

    /// The `rootscale-caller` header for a call in `window` (see [`Tracer::proof_window`]) made for a request
    /// measured with `weight`, or left out of the sample (`None`).
    pub(crate) fn caller_header(&self, window: u64, weight: Option<u32>) -> HeaderValue {
        let shared = &self.shared;
        match (&shared.membership, weight) {
            (Some(membership), _) => membership.caller_header(window, weight),
            (None, None) => shared.unsampled_caller_header.clone(),
            (None, Some(1)) => shared.caller_header.clone(),
            (None, Some(weight)) if weight == shared.sample.every() => shared.weighted_caller_header.clone(),
            (None, Some(weight)) => {
                CallerHeader::encode_with_proof(&shared.service, shared.agent.as_deref(), "", Some(weight))
            }
        }
    }

    /// Chooses whether a request or call from outside any measured request, at `at`, is measured, and its weight.
    #[inline]
    pub(crate) fn choose(&self, at: crate::measure::clock::Instant) -> Option<u32> {
        let shared = &self.shared;
        if !shared.sample.is_sampling() {
            return Some(1);
        }
        let slice = shared.aggregator.clock().slice_at(at, u64::from(SAMPLE_RESERVOIR));
        shared.sample.choose(&shared.reservoir, slice)
    }

    /// `write` of the `;i=…;p=…` that ends a timing header in `window` (empty without a mesh key).
    pub(crate) fn with_timing_proof<R>(&self, window: u64, write: impl FnOnce(&[u8]) -> R) -> R {
        match &self.shared.membership {
            Some(membership) => membership.with_timing_proof(window, write),
            None => write(b""),
        }
    }

    /// Who reads `role` headers for this tracer, with its keys' generation (see [`believed`]).
    fn reader(&self, role: HeaderRole) -> Reader {
        let generation = self.shared.membership.as_ref().map_or(0, Membership::generation);
        Reader { id: self.shared.reader_id, generation, role }
    }

    /// Whether a header's claim is believed: without a mesh key always (`Ok(None)`: there is no window to be
    /// current in); with one when its proof verifies (`Ok` of the window it was made in). A refusal is counted by
    /// header and reason.
    fn believes(
        &self,
        role: HeaderRole,
        claimed: (&[u8], &[u8]),
        proof: Option<(u64, &[u8])>,
        window: u64,
    ) -> Result<Option<u64>, Rejection> {
        match &self.shared.membership {
            None => Ok(None),
            Some(membership) => membership.verify(role, claimed.0, claimed.1, proof, window).map(Some),
        }
    }

    /// The window a recognised header end must be current for: `None` without a mesh key.
    fn recall_window(&self, window: u64) -> Option<u64> {
        self.shared.membership.as_ref().map(|_| window)
    }

    /// A request's `rootscale-caller`, received in `window`, if well formed and believed: without a mesh key any
    /// well-formed one, with a key one whose proof verifies (docs/DESIGN.md §1.6). A malformed or refused header is
    /// counted and read as absent.
    pub(crate) fn read_caller(&self, value: &HeaderValue, window: u64) -> Option<CallerHeader> {
        let reader = self.reader(HeaderRole::Caller);
        let now = self.recall_window(window);
        if let Some(reading) = reader.recall_caller(now, value.as_bytes()) {
            return Some(CallerHeader::read_before(value, &reading));
        }
        let caller = match CallerHeader::parse_recognizing(value, |service, end| reader.recall(now, service, end)) {
            Ok((caller, true)) => caller,
            Ok((caller, false)) => {
                let claimed = caller.claimed();
                let made_in = self.believes(HeaderRole::Caller, claimed, caller.proof(), window).ok()?;
                let (end, fields) = caller.end();
                reader.remember(made_in, claimed.0, end, fields);
                caller
            }
            Err(error) => {
                self.shared.counters.malformed_caller.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, "ignoring malformed rootscale-caller header");
                return None;
            }
        };
        reader.remember_caller(now, value.as_bytes(), caller.reading());
        Some(caller)
    }

    /// A callee's `rootscale-timing`, received in `window`: `Ok(None)` when it is well formed but not believed
    /// (as [`Tracer::read_caller`]); a malformed one is counted and returned as the error.
    pub(crate) fn read_timing(&self, value: &HeaderValue, window: u64) -> Result<Option<Timing>, HeaderError> {
        let reader = self.reader(HeaderRole::Timing);
        let now = self.recall_window(window);
        match Timing::parse_recognizing(value, |service, end| reader.recall(now, service, end)) {
            Ok((timing, true)) => Ok(Some(timing)),
            Ok((timing, false)) => {
                let claimed = timing.claimed();
                let Ok(made_in) = self.believes(HeaderRole::Timing, claimed, timing.proof(), window) else {
                    return Ok(None);
                };
                let (end, fields) = timing.end();
                reader.remember(made_in, claimed.0, end, fields);
                Ok(Some(timing))
            }
            Err(error) => {
                self.shared.counters.malformed_timing.fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        }
    }
}
