//! The per-request context: the clock that splits a request's time into busy, cpu_wait and the rest, and the
//! bookkeeping of its outbound calls (the union of their in-flight intervals and the critical path).
//!
//! The server layer creates one context per request and installs it as a task-local while it polls the handler
//! (and the response body), so outbound calls made by the handler find their request without any argument
//! passing. Work spawned onto other tasks carries it explicitly with [`RequestHandle::scope`] or
//! [`InRequestExt::in_current_request`].
//!
//! Everything here is per request: a small uncontended mutex for the calls (they may finish on other threads) and
//! atomics for the wake time. Nothing is shared between requests.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
    time::{Duration, Instant},
};

use futures_util::task::AtomicWaker;

use crate::measure::record::Wait;

tokio::task_local! {
    static CURRENT: Arc<RequestContext>;
}

/// State of one request, shared by its handler future, its response body and its outbound calls.
pub(crate) struct RequestContext {
    /// When the server layer was handed the request; `total` starts here.
    pub(crate) start: Instant,
    /// Nanoseconds after `start` (plus one, so zero means "not woken") of the first wake since the last poll.
    woken_at: AtomicU64,
    /// The waker of the task that polls the handler; our own waker forwards to it.
    task_waker: AtomicWaker,
    /// Set by the first outbound call, so requests that make none never take the calls lock.
    made_calls: AtomicBool,
    /// Outbound calls in flight now: a copy of `Calls::in_flight` readable without the lock.
    in_flight: AtomicU32,
    /// CPU work done for the request on another thread or pool, and the time it queued there, in nanoseconds
    /// (see [`RequestHandle::record_offloaded_cpu`]).
    offloaded_busy_ns: AtomicU64,
    offloaded_queued_ns: AtomicU64,
    /// Time the request queued for a worker of the service's pool, in nanoseconds (see
    /// [`RequestHandle::record_pool_wait`]).
    pool_wait_ns: AtomicU64,
    calls: Mutex<Calls>,
}

#[derive(Default)]
struct Calls {
    in_flight: u32,
    group_start: Option<Instant>,
    downstream: Duration,
    /// The largest of `max(net_wait, remote_wait)` over calls on the critical path.
    critical_wait: Option<Wait>,
}

impl RequestContext {
    /// A request handed over at `start`. It is runnable from that instant, so the time until its first poll (for
    /// example a task spawned per HTTP/2 stream waiting for a thread) counts as cpu_wait.
    pub(crate) fn new(start: Instant) -> Arc<Self> {
        Arc::new(Self {
            start,
            woken_at: AtomicU64::new(1),
            task_waker: AtomicWaker::new(),
            made_calls: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            offloaded_busy_ns: AtomicU64::new(0),
            offloaded_queued_ns: AtomicU64::new(0),
            pool_wait_ns: AtomicU64::new(0),
            calls: Mutex::new(Calls::default()),
        })
    }

    fn nanos_since_start(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    fn lock_calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        // A poisoned lock only means another call's bookkeeping panicked; the counters are still usable.
        self.calls.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An outbound call starts.
    pub(crate) fn call_started(&self, now: Instant) {
        self.made_calls.store(true, Ordering::Release);
        let mut calls = self.lock_calls();
        if calls.in_flight == 0 {
            calls.group_start = Some(now);
        }
        calls.in_flight += 1;
        self.in_flight.store(calls.in_flight, Ordering::Release);
    }

    /// An outbound call whose largest wait was `wait_us` ended; returns whether it was the last of its overlapping
    /// group, i.e. on the critical path. `wait` makes the owned wait, only if it becomes the largest so far.
    pub(crate) fn call_finished(&self, now: Instant, wait_us: u64, wait: impl FnOnce() -> Wait) -> bool {
        let mut calls = self.lock_calls();
        calls.in_flight = calls.in_flight.saturating_sub(1);
        self.in_flight.store(calls.in_flight, Ordering::Release);
        if calls.in_flight > 0 {
            return false;
        }
        if let Some(group_start) = calls.group_start.take() {
            calls.downstream += now.saturating_duration_since(group_start);
        }
        if calls.critical_wait.as_ref().is_none_or(|current| wait_us > current.us) {
            calls.critical_wait = Some(wait());
        }
        true
    }

    /// CPU work done elsewhere for this request: (running, queued).
    pub(crate) fn offloaded(&self) -> (Duration, Duration) {
        (
            Duration::from_nanos(self.offloaded_busy_ns.load(Ordering::Acquire)),
            Duration::from_nanos(self.offloaded_queued_ns.load(Ordering::Acquire)),
        )
    }

    /// Time queued for a worker of the service's pool.
    pub(crate) fn pool_wait(&self) -> Duration {
        Duration::from_nanos(self.pool_wait_ns.load(Ordering::Acquire))
    }

    /// Downstream time up to `now` (an open group counts until `now`) and the largest critical-path wait.
    pub(crate) fn downstream_until(&self, now: Instant) -> (Duration, Option<Wait>) {
        if !self.made_calls.load(Ordering::Acquire) {
            return (Duration::ZERO, None);
        }
        let calls = self.lock_calls();
        let open = calls.group_start.map_or(Duration::ZERO, |start| now.saturating_duration_since(start));
        (calls.downstream + open, calls.critical_wait.clone())
    }
}

impl Wake for RequestContext {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let now = self.nanos_since_start(Instant::now());
        // Keep the first wake since the last poll: the task has been runnable since then.
        let _ = self.woken_at.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
        self.task_waker.wake();
    }
}

/// Splits the time of a request's polls (its handler future, then its response body) into busy (inside poll) and
/// cpu_wait (woken, not yet polled).
pub(crate) struct PollClock {
    context: Arc<RequestContext>,
    waker: Waker,
    pub(crate) busy: Duration,
    /// The part of `busy` spent while an outbound call was in flight, which `downstream` already covers.
    pub(crate) busy_in_downstream: Duration,
    pub(crate) cpu_wait: Duration,
}

impl PollClock {
    pub(crate) fn new(context: Arc<RequestContext>) -> Self {
        let waker = Waker::from(context.clone());
        Self { context, waker, busy: Duration::ZERO, busy_in_downstream: Duration::ZERO, cpu_wait: Duration::ZERO }
    }

    pub(crate) fn context(&self) -> &Arc<RequestContext> {
        &self.context
    }

    /// Polls `poll` with the request installed as the task-local and our recording waker; `started` is now.
    /// Returns the result and the instant the poll ended.
    pub(crate) fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        started: Instant,
        poll: impl FnOnce(&mut Context<'_>) -> T,
    ) -> (T, Instant) {
        let woken = self.context.woken_at.swap(0, Ordering::AcqRel);
        if woken != 0 {
            let polled = self.context.nanos_since_start(started);
            self.cpu_wait += Duration::from_nanos(polled.saturating_sub(woken));
        }
        self.context.task_waker.register(cx.waker());
        let overlapping = self.context.in_flight.load(Ordering::Acquire) > 0;
        let mut inner_cx = Context::from_waker(&self.waker);
        let result = CURRENT.sync_scope(self.context.clone(), || poll(&mut inner_cx));
        let ended = Instant::now();
        let busy = ended.saturating_duration_since(started);
        self.busy += busy;
        if overlapping {
            self.busy_in_downstream += busy;
        }
        // A wake during the poll is only waiting for CPU from the moment the poll ended.
        let woken = self.context.woken_at.load(Ordering::Acquire);
        if woken != 0 {
            let ended_at = self.context.nanos_since_start(ended);
            if woken < ended_at {
                let _ = self.context.woken_at.compare_exchange(woken, ended_at, Ordering::AcqRel, Ordering::Acquire);
            }
        }
        (result, ended)
    }
}

/// The current request, if this code runs inside one (directly or via [`RequestHandle::scope`]).
pub(crate) fn current() -> Option<Arc<RequestContext>> {
    CURRENT.try_with(Arc::clone).ok()
}

/// A handle on the request the current task is serving, for carrying it into spawned tasks.
///
/// ```no_run
/// # async fn handler(work: impl std::future::Future<Output = ()> + Send + 'static) {
/// // Inside a handler: the spawned work's outbound calls still count toward this request.
/// let request = rootscale_tracer::RequestHandle::current();
/// tokio::spawn(request.scope(work)).await.unwrap();
/// # }
/// ```
#[derive(Clone)]
pub struct RequestHandle(Option<Arc<RequestContext>>);

impl RequestHandle {
    /// The request being served by the current task (a no-op handle outside any request).
    pub fn current() -> Self {
        Self(current())
    }

    /// Whether there is a request behind this handle.
    pub fn is_active(&self) -> bool {
        self.0.is_some()
    }

    /// Records CPU work done for this request off its own task — on a blocking pool (`spawn_blocking`), a rayon
    /// pool, or a modelled core — which the request's poll clock cannot see: `running` counts as busy, `queued`
    /// (waiting for that pool) as cpu_wait. Unrecorded, that time is local wait of an unknown kind, and the
    /// agent's utilisation law misses the CPU it used. The work must not overlap the request's outbound calls.
    /// A no-op outside a request.
    pub fn record_offloaded_cpu(&self, running: Duration, queued: Duration) {
        if let Some(context) = &self.0 {
            let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            context.offloaded_busy_ns.fetch_add(nanos(running), Ordering::AcqRel);
            context.offloaded_queued_ns.fetch_add(nanos(queued), Ordering::AcqRel);
        }
    }

    /// Records time this request queued for a worker of the service's own pool (a servlet container's threads,
    /// gunicorn's workers, a semaphore in front of the handler). It stays part of the request's local wait, and is
    /// also kept apart: in a service whose workers are held for the whole request (declared with
    /// [`crate::AgentBuilder::pool_scope`]), a pool full of workers waiting on a slow callee is that callee's
    /// doing, and the decision attributes it so (docs/DESIGN.md §1.7). A no-op outside a request.
    pub fn record_pool_wait(&self, queued: Duration) {
        if let Some(context) = &self.0 {
            context.pool_wait_ns.fetch_add(u64::try_from(queued.as_nanos()).unwrap_or(u64::MAX), Ordering::AcqRel);
        }
    }

    /// Runs `future` as part of this request: outbound calls it makes count toward the request.
    pub fn scope<F: Future>(self, future: F) -> InRequest<F> {
        InRequest { context: self.0, future }
    }
}

pin_project_lite::pin_project! {
    /// A future that runs inside a request's context. Made by [`RequestHandle::scope`].
    pub struct InRequest<F> {
        context: Option<Arc<RequestContext>>,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for InRequest<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        match this.context {
            Some(context) => CURRENT.sync_scope(context.clone(), || this.future.poll(cx)),
            None => this.future.poll(cx),
        }
    }
}

/// Carries the current request into a future that will run elsewhere (typically `tokio::spawn`).
pub trait InRequestExt: Future + Sized {
    /// `tokio::spawn(work.in_current_request())` keeps `work`'s outbound calls attributed to this request.
    fn in_current_request(self) -> InRequest<Self> {
        RequestHandle::current().scope(self)
    }
}

impl<F: Future> InRequestExt for F {}
