//! The per-request context: the clock that splits a request's time into busy, cpu_wait and the rest, and the
//! bookkeeping of its outbound calls (the union of their in-flight intervals and the critical path).
//!
//! The server layer creates one context per request and sets it as the thread's current request for the length of
//! each poll of the handler (and of the response body), so outbound calls made by the handler find their request
//! without any argument passing. Work spawned onto other tasks carries it explicitly with [`RequestHandle::scope`] or
//! [`InRequestExt::in_current_request`].
//!
//! Everything here is per request and lock-free: calls may start and finish on other threads, so their
//! bookkeeping is a few atomics ([`CallGroups`], [`CriticalWait`]), as is the wake time. Nothing is shared between
//! requests: a finished context is reused by a later request on the same thread only once nothing else holds it.

use std::{
    cell::{Cell, RefCell},
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

use futures_util::task::AtomicWaker;

use crate::measure::{
    clock::{self, Instant},
    headers::CallerHeader,
    record::{Wait, nanos},
    reuse::{keep_spare, take_spare},
};

/// What the thread's current-request slot holds. A measured request is held by address only, so that setting the
/// slot for a poll costs no reference count; [`current`] takes a counted reference when it needs one.
#[derive(Clone, Copy)]
enum Slot {
    Outside,
    Unsampled,
    Measured(*const RequestContext),
}

thread_local! {
    /// The request the code running on this thread serves, set for the length of one poll of its handler, its
    /// response body or work scoped to it. A plain thread-local of a `Copy` value rather than tokio's task-local:
    /// a poll sets and restores it in place, twice per request, with no borrow flag, guard or destructor to pay for.
    static CURRENT: Cell<Slot> = const { Cell::new(Slot::Outside) };
}

/// Puts back what the slot held before a scope when the scope ends, by return or by unwinding.
struct Restore(Slot);

impl Drop for Restore {
    fn drop(&mut self) {
        CURRENT.set(self.0);
    }
}

/// Runs `f` with `slot` in the current-request slot. Private: every `Slot::Measured` it is given is the address of
/// an `Arc` its caller borrows for the whole call (see [`current`]).
#[inline]
fn in_slot<R>(slot: Slot, f: impl FnOnce() -> R) -> R {
    let _restore = Restore(CURRENT.replace(slot));
    f()
}

/// Runs `f` with `context` as the current request.
fn in_request<R>(context: &Arc<RequestContext>, f: impl FnOnce() -> R) -> R {
    in_slot(Slot::Measured(Arc::as_ptr(context)), f)
}

/// The request the current task serves: one being measured, or one left out of the sample (whose calls are left
/// out too, see [`crate::measure::sample`]).
#[derive(Clone)]
pub(crate) enum Current {
    Measured(Arc<RequestContext>),
    Unsampled,
}

impl Current {
    /// Runs `f` with this as the current request.
    #[inline]
    pub(crate) fn sync_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        match self {
            Current::Measured(context) => in_request(context, f),
            Current::Unsampled => in_slot(Slot::Unsampled, f),
        }
    }
}

/// State of one request, shared by its handler future, its response body and its outbound calls.
pub(crate) struct RequestContext {
    /// When the server layer was handed the request; `total` starts here.
    pub(crate) start: Instant,
    /// How many requests this one stands for (1 unless sampling): its calls are recorded, and passed on, with it.
    pub(crate) weight: u32,
    /// The instrumented caller that sent the request, if it proved itself one. Kept here, in the context the
    /// thread reuses, rather than in the response future and body, which are moved several times per request.
    pub(crate) caller: Option<CallerHeader>,
    /// Nanoseconds after `start` (plus one, so zero means "not woken") of the first wake since the last poll.
    woken_at: AtomicU64,
    /// The waker of the task that polls the handler; our own waker forwards to it.
    task_waker: AtomicWaker,
    /// Set by the first outbound call, so requests that make none skip the calls' bookkeeping.
    made_calls: AtomicBool,
    /// CPU work done for the request on another thread or pool, and the time it queued there, in nanoseconds
    /// (see [`RequestHandle::record_offloaded_cpu`]).
    offloaded_busy_ns: AtomicU64,
    offloaded_queued_ns: AtomicU64,
    /// Time the request queued for a worker of the service's pool, in nanoseconds (see
    /// [`RequestHandle::record_pool_wait`]).
    pool_wait_ns: AtomicU64,
    calls: CallGroups,
    /// The largest of `max(net_wait, remote_wait)` over calls on the critical path.
    critical_wait: CriticalWait,
}

/// The request's outbound calls as groups of overlapping calls: how many are in flight, when the open group
/// began, and the summed length of the closed ones — the union of the calls' in-flight intervals.
#[derive(Default)]
struct CallGroups {
    /// Calls in flight (the high 16 bits) and, in nanoseconds after the request's start (the low 47 bits), the
    /// open group's start — or, with none in flight, the last group's end — with [`CLOSING`] set while the last
    /// call of a group adds the group to `downstream_ns`.
    open: AtomicU64,
    downstream_ns: AtomicU64,
}

/// Set in `CallGroups::open` between a group's last call ending and its length being added.
const CLOSING: u64 = 1 << 47;
const START_MASK: u64 = CLOSING - 1;
const IN_FLIGHT_SHIFT: u32 = 48;
/// How long a reader waits for a group's close to finish, in spins.
const MAX_CLOSING_SPINS: u32 = 1_000;
/// More calls than this in flight at once are counted as this many (the group stays open while any is).
const MAX_IN_FLIGHT: u64 = (1 << 16) - 1;

impl CallGroups {
    fn in_flight(word: u64) -> u64 {
        word >> IN_FLIGHT_SHIFT
    }

    /// A call starts `at` nanoseconds after the request did.
    fn started(&self, at: u64) {
        let _ = self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
            let in_flight = Self::in_flight(word);
            // The first call of a group (or one that starts while the previous group is being closed) opens a group,
            // no earlier than the last one ended: on another thread, a call's clock may have been read before the
            // previous group's last call read its own, and the two groups must not both count that time.
            let start = if in_flight == 0 { at.min(START_MASK).max(word & START_MASK) } else { word & START_MASK };
            Some(((in_flight + 1).min(MAX_IN_FLIGHT) << IN_FLIGHT_SHIFT) | start)
        });
    }

    /// A call ends `at` nanoseconds after the request started; whether it closed its group.
    fn finished(&self, at: u64) -> bool {
        let mut word = self.open.load(Ordering::Acquire);
        // The group's end, never before its start.
        let end = |word: u64| at.min(START_MASK).max(word & START_MASK);
        loop {
            let in_flight = Self::in_flight(word);
            let next = match in_flight {
                0 => return false,
                1 => CLOSING | end(word),
                _ => word - (1 << IN_FLIGHT_SHIFT),
            };
            match self.open.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) if in_flight == 1 => break,
                Ok(_) => return false,
                Err(now) => word = now,
            }
        }
        let (start, end) = (word & START_MASK, end(word));
        self.downstream_ns.fetch_add(end - start, Ordering::AcqRel);
        // Keep the end for the next group to start from. A call that started meanwhile has replaced the closing
        // mark with its own group: leave that.
        let _ = self.open.compare_exchange(CLOSING | end, end, Ordering::AcqRel, Ordering::Acquire);
        true
    }

    fn any_in_flight(&self) -> bool {
        Self::in_flight(self.open.load(Ordering::Acquire)) > 0
    }

    /// The union's length up to `at` (an open group counts until then), read consistently: a group's close is
    /// either wholly in the sum or wholly open.
    fn until(&self, at: u64) -> u64 {
        let mut tries = 0;
        loop {
            let before = self.downstream_ns.load(Ordering::Acquire);
            let word = self.open.load(Ordering::Acquire);
            let after = self.downstream_ns.load(Ordering::Acquire);
            let closing = before != after || word & CLOSING != 0 && Self::in_flight(word) == 0;
            // A group being closed on another thread this very moment is a few instructions away from done; a
            // closer preempted in between is not waited for (never block): its group may then be missed.
            if closing && tries < MAX_CLOSING_SPINS {
                tries += 1;
                std::hint::spin_loop();
                continue;
            }
            let open = if Self::in_flight(word) > 0 { at.saturating_sub(word & START_MASK) } else { 0 };
            return after + open;
        }
    }
}

/// Slots for successively larger critical waits; a request that beats its largest more often than this uses the
/// fallback, behind a lock.
const CRITICAL_SLOTS: usize = 4;

/// The largest critical-path wait, kept without a lock: each larger wait is written once into a slot of its own,
/// and one word names the largest so far (its microseconds and its slot).
#[derive(Default)]
struct CriticalWait {
    /// `us << 8 | slot`, slot counted from one (0: none yet); [`FALLBACK`] names `fallback`.
    best: AtomicU64,
    used: AtomicUsize,
    slots: [OnceLock<Wait>; CRITICAL_SLOTS],
    fallback: Mutex<Option<Wait>>,
}

const FALLBACK: u64 = 0xFF;

impl CriticalWait {
    fn best_us(word: u64) -> Option<u64> {
        (word != 0).then_some(word >> 8)
    }

    /// Keeps `us` (made into a wait by `wait`) if it is larger than the largest so far.
    fn offer(&self, us: u64, wait: impl FnOnce() -> Wait) {
        let us = us.min(u64::MAX >> 8);
        if Self::best_us(self.best.load(Ordering::Acquire)).is_some_and(|best| us <= best) {
            return;
        }
        let index = self.used.fetch_add(1, Ordering::AcqRel);
        let slot = match self.slots.get(index) {
            Some(slot) => {
                let _ = slot.set(wait());
                index as u64 + 1
            }
            None => {
                let mut fallback = self.fallback.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if fallback.as_ref().is_none_or(|kept| us > kept.us) {
                    *fallback = Some(wait());
                }
                FALLBACK
            }
        };
        let _ = self.best.fetch_update(Ordering::AcqRel, Ordering::Acquire, |best| {
            Self::best_us(best).is_none_or(|best| us > best).then_some(us << 8 | slot)
        });
    }

    fn get(&self) -> Option<Wait> {
        let best = self.best.load(Ordering::Acquire);
        match best & 0xFF {
            0 => None,
            FALLBACK => self.fallback.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone(),
            slot => self.slots.get(slot as usize - 1).and_then(|slot| slot.get().cloned()),
        }
    }
}

thread_local! {
    /// Contexts nothing else holds, reset. A thread's own: taking one is no lock and no shared memory.
    static RECYCLED: RefCell<Vec<Arc<RequestContext>>> = const { RefCell::new(Vec::new()) };
}

impl RequestContext {
    /// A request handed over at `start`. It is runnable from that instant, so the time until its first poll (for
    /// example a task spawned per HTTP/2 stream waiting for a thread) counts as cpu_wait.
    pub(crate) fn new(start: Instant, weight: u32, caller: Option<CallerHeader>) -> Arc<Self> {
        if let Some(mut context) = take_spare(&RECYCLED)
            && let Some(fresh) = Arc::get_mut(&mut context)
        {
            // Reset when it was handed back; only the request's own values are new.
            fresh.start = start;
            fresh.weight = weight;
            fresh.caller = caller;
            return context;
        }
        Arc::new(Self::fresh(start, weight, caller))
    }

    /// Hands a finished request's context back for a later request on this thread — when nothing else holds it
    /// any more (a waker the handler's future kept, a call still in flight); otherwise it is simply dropped.
    pub(crate) fn recycle(mut context: Arc<Self>) {
        let Some(finished) = Arc::get_mut(&mut context) else { return };
        // Reset now, not on reuse: what it holds (the task's waker, a wait's names) is let go of at once.
        finished.reset();
        keep_spare(&RECYCLED, context);
    }

    /// As [`RequestContext::fresh`] made it, writing only what a request changed: most make no calls, and the call
    /// bookkeeping is most of the context's size.
    fn reset(&mut self) {
        self.caller = None;
        *self.woken_at.get_mut() = 1;
        self.task_waker = AtomicWaker::new();
        *self.offloaded_busy_ns.get_mut() = 0;
        *self.offloaded_queued_ns.get_mut() = 0;
        *self.pool_wait_ns.get_mut() = 0;
        if std::mem::take(self.made_calls.get_mut()) {
            self.calls = CallGroups::default();
            self.critical_wait = CriticalWait::default();
        }
    }

    fn fresh(start: Instant, weight: u32, caller: Option<CallerHeader>) -> Self {
        Self {
            start,
            weight,
            caller,
            woken_at: AtomicU64::new(1),
            task_waker: AtomicWaker::new(),
            made_calls: AtomicBool::new(false),
            offloaded_busy_ns: AtomicU64::new(0),
            offloaded_queued_ns: AtomicU64::new(0),
            pool_wait_ns: AtomicU64::new(0),
            calls: CallGroups::default(),
            critical_wait: CriticalWait::default(),
        }
    }

    fn nanos_since_start(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.start)).min(u64::MAX - 1) + 1
    }

    /// An outbound call starts.
    pub(crate) fn call_started(&self, now: Instant) {
        self.made_calls.store(true, Ordering::Release);
        self.calls.started(self.nanos_since_start(now));
    }

    /// An outbound call whose largest wait was `wait_us` ended; returns whether it was the last of its overlapping
    /// group, i.e. on the critical path. `wait` makes the owned wait, only if it becomes the largest so far.
    pub(crate) fn call_finished(&self, now: Instant, wait_us: u64, wait: impl FnOnce() -> Wait) -> bool {
        if !self.calls.finished(self.nanos_since_start(now)) {
            return false;
        }
        self.critical_wait.offer(wait_us, wait);
        true
    }

    /// CPU work done elsewhere for this request: (running, queued).
    pub(crate) fn offloaded_ns(&self) -> (u64, u64) {
        (self.offloaded_busy_ns.load(Ordering::Acquire), self.offloaded_queued_ns.load(Ordering::Acquire))
    }

    /// Time queued for a worker of the service's pool.
    pub(crate) fn pool_wait_ns(&self) -> u64 {
        self.pool_wait_ns.load(Ordering::Acquire)
    }

    /// Downstream time up to `now` (an open group counts until `now`) and the largest critical-path wait.
    pub(crate) fn downstream_ns_until(&self, now: Instant) -> (u64, Option<Wait>) {
        if !self.made_calls.load(Ordering::Acquire) {
            return (0, None);
        }
        (self.calls.until(self.nanos_since_start(now)), self.critical_wait.get())
    }
}

impl Wake for RequestContext {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let now = self.nanos_since_start(clock::now());
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
    /// Nanoseconds, as the rest of the request path keeps time: the Durations' arithmetic costs more, and this
    /// clock travels inside every response future and body.
    pub(crate) busy_ns: u64,
    /// The part of `busy_ns` spent while an outbound call was in flight, which `downstream` already covers.
    pub(crate) busy_in_downstream_ns: u64,
    pub(crate) cpu_wait_ns: u64,
}

impl PollClock {
    pub(crate) fn new(context: Arc<RequestContext>) -> Self {
        let waker = Waker::from(context.clone());
        Self { context, waker, busy_ns: 0, busy_in_downstream_ns: 0, cpu_wait_ns: 0 }
    }

    pub(crate) fn context(&self) -> &Arc<RequestContext> {
        &self.context
    }

    /// The request's context, once its polls are over (the clock's own waker let go of).
    pub(crate) fn into_context(self) -> Arc<RequestContext> {
        self.context
    }

    /// Polls `poll` with the request as the thread's current one and our recording waker; `started` is now.
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
            self.cpu_wait_ns = self.cpu_wait_ns.saturating_add(polled.saturating_sub(woken));
        }
        self.context.task_waker.register(cx.waker());
        let overlapping = self.context.calls.any_in_flight();
        let mut inner_cx = Context::from_waker(&self.waker);
        let result = in_request(&self.context, || poll(&mut inner_cx));
        let ended = clock::now();
        let busy = nanos(ended.saturating_duration_since(started));
        self.busy_ns = self.busy_ns.saturating_add(busy);
        if overlapping {
            self.busy_in_downstream_ns = self.busy_in_downstream_ns.saturating_add(busy);
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

/// The current request, if this code runs inside one (directly or via [`RequestHandle::scope`]); `None` outside
/// any request.
pub(crate) fn current() -> Option<Current> {
    match CURRENT.get() {
        Slot::Outside => None,
        Slot::Unsampled => Some(Current::Unsampled),
        Slot::Measured(context) => {
            // SAFETY: `Arc::increment_strong_count` needs a pointer from an `Arc` whose strong count is at least
            // one for the length of the call. The slot holds `Measured(p)` only inside `in_request(a, f)`, with
            // `p = Arc::as_ptr(a)` and `a` borrowed until `in_request` returns; before it returns, or while it
            // unwinds, `Restore` puts back the slot's previous value, which an enclosing `in_request` on this
            // thread's stack set the same way (scopes on one thread nest). So whenever the slot is read as
            // `Measured(p)`, the `Arc` `p` came from is alive. `Arc::from_raw` then owns the count just added.
            unsafe {
                Arc::increment_strong_count(context);
                Some(Current::Measured(Arc::from_raw(context)))
            }
        }
    }
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
pub struct RequestHandle(Option<Current>);

impl RequestHandle {
    /// The request being served by the current task (a no-op handle outside any request).
    pub fn current() -> Self {
        Self(current())
    }

    /// Whether there is a request behind this handle (measured or left out of the sample).
    pub fn is_active(&self) -> bool {
        self.0.is_some()
    }

    /// The request's state, if it is measured.
    fn measured(&self) -> Option<&Arc<RequestContext>> {
        match &self.0 {
            Some(Current::Measured(context)) => Some(context),
            _ => None,
        }
    }

    /// Records CPU work done for this request off its own task — on a blocking pool (`spawn_blocking`), a rayon
    /// pool, or a modelled core — which the request's poll clock cannot see: `running` counts as busy, `queued`
    /// (waiting for that pool) as cpu_wait. Unrecorded, that time is local wait of an unknown kind, and the
    /// agent's utilisation law misses the CPU it used. The work must not overlap the request's outbound calls.
    /// A no-op outside a request.
    pub fn record_offloaded_cpu(&self, running: Duration, queued: Duration) {
        if let Some(context) = self.measured() {
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
        if let Some(context) = self.measured() {
            context.pool_wait_ns.fetch_add(nanos(queued), Ordering::AcqRel);
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
        context: Option<Current>,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for InRequest<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        match this.context {
            Some(context) => context.sync_scope(|| this.future.poll(cx)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::record::WaitPoint;

    fn wait(service: &str, us: u64) -> Wait {
        Wait { point: WaitPoint::Local { service: service.into() }, us }
    }

    #[test]
    fn a_scope_sets_the_current_request_and_puts_back_the_one_before_even_when_it_unwinds() {
        let is = |current: Option<Current>, expected: Option<&Arc<RequestContext>>| match (current, expected) {
            (None, None) | (Some(Current::Unsampled), None) => true,
            (Some(Current::Measured(got)), Some(expected)) => Arc::ptr_eq(&got, expected),
            _ => false,
        };
        let outer = RequestContext::new(clock::now(), 1, None);
        let inner = RequestContext::new(clock::now(), 1, None);
        assert!(current().is_none());
        let kept = in_request(&outer, || {
            assert!(is(current(), Some(&outer)));
            in_request(&inner, || assert!(is(current(), Some(&inner))));
            assert!(is(current(), Some(&outer)), "the outer request is back after the inner scope");
            let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Current::Unsampled.sync_scope(|| {
                    assert!(matches!(current(), Some(Current::Unsampled)));
                    panic!("a handler panics");
                })
            }));
            assert!(unwound.is_err());
            assert!(is(current(), Some(&outer)), "the outer request is back after an unwinding scope");
            current()
        });
        assert!(current().is_none(), "nothing is current after the outermost scope");
        // What `current` handed out is a counted reference of its own: it outlives the scope.
        let Some(Current::Measured(kept)) = kept else { panic!("the outer request was current") };
        assert!(Arc::ptr_eq(&kept, &outer));
        assert_eq!(Arc::strong_count(&outer), 2, "the test's own and the one current() handed out");
        drop(kept);
        assert_eq!(Arc::strong_count(&outer), 1);
    }

    #[test]
    fn call_groups_are_the_union_of_in_flight_intervals() {
        let groups = CallGroups::default();
        // One call, 100 → 150.
        groups.started(100);
        assert_eq!(groups.until(120), 20, "an open group counts until now");
        assert!(groups.finished(150), "the only call closes its group");
        // Two overlapping calls, 200 → 260 and 230 → 300: one group of 100.
        groups.started(200);
        groups.started(230);
        assert!(!groups.finished(260), "a call with another in flight does not close the group");
        assert!(groups.any_in_flight());
        assert!(groups.finished(300));
        assert!(!groups.any_in_flight());
        assert_eq!(groups.until(1_000), 50 + 100);
        assert!(!groups.finished(1_000), "a finish without a start closes nothing");
        assert_eq!(groups.until(1_000), 150);
        // A call whose clock was read (on another thread) before the last group's end, 280 → 400: only 300 → 400
        // is new.
        groups.started(280);
        assert!(groups.finished(400));
        assert_eq!(groups.until(1_000), 150 + 100);
        // And one that read both its clocks before that end counts nothing.
        groups.started(350);
        assert!(groups.finished(390));
        assert_eq!(groups.until(1_000), 250);
    }

    #[test]
    fn call_groups_stay_consistent_across_threads() {
        let groups = Arc::new(CallGroups::default());
        let clock = Arc::new(AtomicU64::new(1));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (groups, clock) = (groups.clone(), clock.clone());
                std::thread::spawn(move || {
                    let mut closed = 0;
                    for _ in 0..20_000 {
                        groups.started(clock.fetch_add(1, Ordering::AcqRel));
                        closed += u64::from(groups.finished(clock.fetch_add(1, Ordering::AcqRel)));
                    }
                    closed
                })
            })
            .collect();
        let closed: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(!groups.any_in_flight(), "every start was matched");
        assert!((1..=80_000).contains(&closed), "{closed} groups closed");
        // The union of intervals on one clock is at least one tick per group and at most the clock's span.
        let end = clock.load(Ordering::Acquire);
        let union = groups.until(end);
        assert!(union >= closed && union < end, "union {union} ns for {closed} groups within {end}");
    }

    #[test]
    fn a_finished_context_is_reused_reset_and_only_when_nothing_else_holds_it() {
        let start = clock::now();
        let context = RequestContext::new(start, 16, None);
        context.call_started(start);
        assert!(context.call_finished(start + Duration::from_micros(5), 5, || wait("a", 5)));
        context.pool_wait_ns.fetch_add(7, Ordering::AcqRel);
        context.offloaded_busy_ns.fetch_add(3, Ordering::AcqRel);
        context.woken_at.store(0, Ordering::Release);
        let kept = Arc::as_ptr(&context);
        RequestContext::recycle(context);
        let later = start + Duration::from_millis(1);
        let reused = RequestContext::new(later, 2, None);
        assert_eq!(Arc::as_ptr(&reused), kept, "the thread's finished context is taken again");
        assert_eq!((reused.start, reused.weight), (later, 2));
        assert_eq!(reused.downstream_ns_until(later), (0, None), "no call of the last request is left");
        assert_eq!(reused.pool_wait_ns(), 0);
        assert_eq!(reused.offloaded_ns(), (0, 0));
        assert!(!reused.made_calls.load(Ordering::Acquire) && !reused.calls.any_in_flight());
        assert_eq!(reused.woken_at.load(Ordering::Acquire), 1, "runnable from its start, as a new one");
        // Held elsewhere (a waker the handler kept): not handed back, so never shared by two requests.
        let held = Waker::from(reused.clone());
        let reused_at = Arc::as_ptr(&reused);
        RequestContext::recycle(reused);
        let next = RequestContext::new(later, 1, None);
        assert_ne!(Arc::as_ptr(&next), reused_at, "a context something still holds is not reused");
        drop(held);
    }

    #[test]
    fn the_largest_critical_wait_is_kept_beyond_the_slots() {
        let critical = CriticalWait::default();
        assert_eq!(critical.get(), None);
        critical.offer(5, || wait("a", 5));
        critical.offer(3, || panic!("a smaller wait is not made"));
        assert_eq!(critical.get(), Some(wait("a", 5)));
        for us in 6..=(6 + CRITICAL_SLOTS as u64 + 2) {
            critical.offer(us, || wait("b", us));
            assert_eq!(critical.get(), Some(wait("b", us)), "after offering {us}");
        }
        critical.offer(2, || panic!("smaller"));
        assert_eq!(critical.get().unwrap().us, 6 + CRITICAL_SLOTS as u64 + 2);
    }
}
