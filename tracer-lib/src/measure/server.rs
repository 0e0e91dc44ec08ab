//! The server layer: measures each request a service handles, answers instrumented callers with
//! `rootscale-timing`, and records the request into its window.
//!
//! Shape (after linkerd's `http/prom` layers): [`TraceServer`] starts the request's clock and reads the caller
//! header in `call`; [`ServerFuture`] polls the handler through a [`PollClock`] (busy, cpu_wait) with the request
//! set as the thread's current one, and when the response head is ready wraps its body in [`ServerBody`], which polls the
//! body through the same clock and records the request when the body ends or is dropped. For gRPC the timing goes
//! into the trailers, written when the body ends; for plain HTTP it goes into the response head.
//!
//! `total` runs from `call` (the request is runnable from then: the wait for its first poll is cpu_wait) to the end
//! of the body, less the time the server spent between taking one body frame and asking for the next (writing it
//! out, or back-pressure from a slow client): that is the link's time, not this service's.
//!
//! Put this layer outermost. Anything outside it (a concurrency limit, a buffer) is waiting the layer cannot see.
//! Generic over request and response bodies, so the same layer works on axum routers, tonic servers and hyper
//! services. Nothing here can fail a request: bad headers are counted and ignored.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    aggregate::RequestSample,
    measure::{
        clock::{self, Instant},
        context::{Current, PollClock, RequestContext},
        grpc::{GrpcHead, grpc_server_error},
        headers::{CALLER_HEADER, TIMING_HEADER},
        record::{RequestRecord, Wait, nanos},
    },
    tracer::Tracer,
};

/// Measures every request of the wrapped service. Made by [`Tracer::server_layer`].
#[derive(Clone, Debug)]
pub struct ServerLayer {
    tracer: Tracer,
}

impl ServerLayer {
    pub(crate) fn new(tracer: Tracer) -> Self {
        Self { tracer }
    }
}

impl<S> Layer<S> for ServerLayer {
    type Service = TraceServer<S>;

    fn layer(&self, inner: S) -> TraceServer<S> {
        TraceServer { inner, tracer: self.tracer.clone() }
    }
}

/// The service made by [`ServerLayer`].
#[derive(Clone, Debug)]
pub struct TraceServer<S> {
    inner: S,
    tracer: Tracer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TraceServer<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<ServerBody<ResBody>>;
    type Error = S::Error;
    type Future = ServerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        self.tracer.shared.aggregator.note_arrival();
        let proof_window = self.tracer.proof_window();
        // A caller that cannot prove membership is outside traffic: measured, but not named, not learned as a
        // neighbour, and not answered with timings (docs/DESIGN.md §1.6).
        let caller =
            request.headers().get(CALLER_HEADER).and_then(|value| self.tracer.read_caller(value, proof_window));
        // Measured with the caller's weight if the caller measured it, left out if the caller did; chosen here if
        // it comes from outside.
        // The clock is read once it is known to be needed: a request its caller left out reads none. A measured
        // request's `total` so starts after its caller header was read: a few tens of nanoseconds in, or a proof's
        // check (microseconds) the first time a thread sees a member's header in a window.
        let (weight, start) = match &caller {
            // Without a mesh key nothing proved the weight: at most this service's own rate's.
            Some(caller) if self.tracer.shared.membership.is_none() => {
                (caller.weight().map(|weight| weight.min(self.tracer.shared.sample.every())), None)
            }
            Some(caller) => (caller.weight(), None),
            None => {
                let now = clock::now();
                (self.tracer.choose(now), Some(now))
            }
        };
        let Some(weight) = weight else {
            return ServerFuture { inner: self.inner.call(request), request: None, unsampled: true };
        };
        let start = start.unwrap_or_else(clock::now);
        let head_only = request.method() == Method::HEAD;
        ServerFuture {
            unsampled: false,
            inner: self.inner.call(request),
            request: Some(Measurement {
                tracer: self.tracer.clone(),
                clock: PollClock::new(RequestContext::new(start, weight, caller)),
                head_only,
                transfer_ns: 0,
                proof_window,
            }),
        }
    }
}

/// What is known about a request while it is served.
struct Measurement {
    tracer: Tracer,
    clock: PollClock,
    /// A HEAD request: its response has no body to wait for.
    head_only: bool,
    /// Nanoseconds between handing out one body frame and being asked for the next: the server writing it out.
    transfer_ns: u64,
    /// The window the request's membership proofs are for: the caller's checked, the timing's made.
    proof_window: u64,
}

/// The largest wait of a request: its own local wait, or one from a call on its critical path.
enum Largest {
    Own,
    Call(Wait),
}

/// The values of a request measured up to one instant.
struct Snapshot {
    total_us: u64,
    busy_us: u64,
    cpu_wait_us: u64,
    downstream_us: u64,
    local_wait_us: u64,
    /// The part of `local_wait_us` queued for a worker of the service's pool.
    pool_wait_us: u64,
    largest: Largest,
    largest_us: u64,
}

/// How a request ended.
#[derive(Clone, Copy)]
struct Outcome {
    /// A server error: 5xx, or a gRPC status that means the server failed.
    error: bool,
    /// The response was abandoned before its end (the client went away, a timeout fired).
    cancelled: bool,
}

impl Measurement {
    fn snapshot(&self, at: Instant) -> Snapshot {
        let clock = &self.clock;
        let context = clock.context();
        // Nanoseconds throughout, each value truncated to microseconds once at the end.
        let total = nanos(at.saturating_duration_since(context.start)).saturating_sub(self.transfer_ns);
        let (downstream, critical_wait) = context.downstream_ns_until(at);
        let (offloaded_busy, offloaded_queued) = context.offloaded_ns();
        // Busy time while calls were in flight is inside `downstream` already; count it once.
        let own_busy = clock.busy_ns.saturating_sub(clock.busy_in_downstream_ns).saturating_add(offloaded_busy);
        let local_wait_us = total.saturating_sub(downstream).saturating_sub(own_busy) / 1_000;
        let (largest, largest_us) = match critical_wait {
            Some(critical) if critical.us > local_wait_us => {
                let us = critical.us;
                (Largest::Call(critical), us)
            }
            _ => (Largest::Own, local_wait_us),
        };
        Snapshot {
            total_us: total / 1_000,
            busy_us: clock.busy_ns.saturating_add(offloaded_busy) / 1_000,
            cpu_wait_us: clock.cpu_wait_ns.saturating_add(offloaded_queued) / 1_000,
            downstream_us: downstream / 1_000,
            local_wait_us,
            pool_wait_us: (context.pool_wait_ns() / 1_000).min(local_wait_us),
            largest,
            largest_us,
        }
    }

    fn timing_header(&self, snapshot: &Snapshot) -> Option<HeaderValue> {
        let point = match &snapshot.largest {
            Largest::Own => None,
            Largest::Call(wait) => Some(wait.point.as_ref()),
        };
        let encoder = &self.tracer.shared.timing_encoder;
        let (total_us, largest_us) = (snapshot.total_us, snapshot.largest_us);
        self.tracer.with_timing_proof(self.proof_window, |proof| encoder.encode(total_us, largest_us, point, proof))
    }

    /// Records the request as ended at `at`.
    fn finish(self, at: Instant, outcome: Outcome) {
        let snapshot = self.snapshot(at);
        let shared = &self.tracer.shared;
        let caller = self.clock.context().caller.as_ref().map(|c| (c.service(), c.agent()));
        shared.aggregator.record_request(
            shared.aggregator.clock().window_at(at),
            &RequestSample {
                caller,
                total_us: snapshot.total_us,
                busy_us: snapshot.busy_us,
                cpu_wait_us: snapshot.cpu_wait_us,
                downstream_us: snapshot.downstream_us,
                local_wait_us: snapshot.local_wait_us,
                pool_wait_us: snapshot.pool_wait_us,
                error: outcome.error,
                cancelled: outcome.cancelled,
                weight: u64::from(self.clock.context().weight),
            },
        );
        if let Some(observer) = &shared.observer {
            observer.on_request(&RequestRecord {
                caller: caller.map(|(service, _)| service.to_string()),
                total: Duration::from_micros(snapshot.total_us),
                busy: Duration::from_micros(snapshot.busy_us),
                cpu_wait: Duration::from_micros(snapshot.cpu_wait_us),
                downstream: Duration::from_micros(snapshot.downstream_us),
                local_wait: Duration::from_micros(snapshot.local_wait_us),
                pool_wait: Duration::from_micros(snapshot.pool_wait_us),
                largest_wait: match snapshot.largest {
                    Largest::Own => Wait { point: shared.local_point.clone(), us: snapshot.largest_us },
                    Largest::Call(wait) => wait,
                },
                error: outcome.error,
                cancelled: outcome.cancelled,
                weight: self.clock.context().weight,
            });
        }
        RequestContext::recycle(self.clock.into_context());
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`TraceServer`].
    pub struct ServerFuture<F> {
        #[pin]
        inner: F,
        // Inline, not boxed: a move of its few hundred bytes costs less than an allocation per request.
        request: Option<Measurement>,
        // Left out of the sample: polled as such, so its calls are left out too.
        unsampled: bool,
    }

    impl<F> PinnedDrop for ServerFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before the response was ready: the client went away or a timeout fired.
            if let Some(request) = this.project().request.take() {
                request.finish(clock::now(), Outcome { error: false, cancelled: true });
            }
        }
    }
}

/// A response that has no body by definition.
fn bodiless(status: StatusCode) -> bool {
    status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
}

impl<F, ResBody, E> Future for ServerFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Body,
{
    type Output = Result<Response<ServerBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(request) = this.request.as_mut() else {
            // Left out of the sample, or polled after completion (then the inner future decides what that means).
            let unsampled = *this.unsampled;
            let result = if unsampled {
                ready!(Current::Unsampled.sync_scope(|| this.inner.poll(cx)))
            } else {
                ready!(this.inner.poll(cx))
            };
            return Poll::Ready(result.map(|response| response.map(|body| ServerBody::passthrough(body, unsampled))));
        };
        let (result, ended) = request.clock.poll(cx, clock::now(), |cx| this.inner.as_mut().poll(cx));
        let Poll::Ready(result) = result else {
            return Poll::Pending;
        };
        let Some(request) = this.request.take() else {
            return Poll::Pending; // unreachable: checked above
        };
        match result {
            Ok(mut response) => {
                // Timing goes only to instrumented callers (who named themselves), unless configured otherwise:
                // an entry service does not tell the outside world its internal service names and timings.
                let send_timing = request.clock.context().caller.is_some() || request.tracer.shared.timing_for_everyone;
                // gRPC sends its status in trailers, after the body: so does the timing. A trailers-only gRPC
                // response (an error) has its status in the head, and the timing goes there too.
                let grpc = GrpcHead::of(response.headers());
                let deferred = grpc.deferred();
                if send_timing && !deferred {
                    let snapshot = request.snapshot(ended);
                    if let Some(value) = request.timing_header(&snapshot) {
                        response.headers_mut().insert(TIMING_HEADER, value);
                    }
                }
                let state = BodyState {
                    error: response.status().is_server_error() || grpc.server_error(),
                    bodiless: request.head_only || bodiless(response.status()),
                    trailers_timing: send_timing && deferred,
                    last_frame_at: None,
                    request,
                };
                Poll::Ready(Ok(response.map(|body| ServerBody::new(body, state))))
            }
            Err(error) => {
                request.finish(ended, Outcome { error: true, cancelled: false });
                Poll::Ready(Err(error))
            }
        }
    }
}

struct BodyState {
    request: Measurement,
    /// Write the timing into the trailers (gRPC).
    trailers_timing: bool,
    error: bool,
    /// The response has no body (HEAD, 1xx, 204, 304): the server may drop it unread.
    bodiless: bool,
    /// When the last frame was handed out, if more may follow.
    last_frame_at: Option<Instant>,
}

pin_project_lite::pin_project! {
    /// The response body of [`TraceServer`]: records the request when it ends or is dropped.
    pub struct ServerBody<B: Body> {
        #[pin]
        inner: B,
        state: Option<BodyState>,
        // Set when the inner body reported its end through `is_end_stream`.
        end_reported: AtomicBool,
        // The body of a request left out of the sample: polled as such.
        unsampled: bool,
    }

    impl<B: Body> PinnedDrop for ServerBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(state) = this.state.take() {
                // hyper and axum drop bodies unread when they know there is nothing to send.
                let complete =
                    state.bodiless || this.end_reported.load(Ordering::Relaxed) || this.inner.is_end_stream();
                let now = clock::now();
                state.request.finish(now, Outcome { error: state.error, cancelled: !complete });
            }
        }
    }
}

impl<B: Body> ServerBody<B> {
    fn passthrough(inner: B, unsampled: bool) -> Self {
        Self { inner, state: None, end_reported: AtomicBool::new(false), unsampled }
    }

    fn new(inner: B, state: BodyState) -> Self {
        Self { inner, state: Some(state), end_reported: AtomicBool::new(false), unsampled: false }
    }
}

impl<B: Body> Body for ServerBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let Some(state) = this.state.as_mut() else {
            if *this.unsampled {
                return Current::Unsampled.sync_scope(|| this.inner.poll_frame(cx));
            }
            return this.inner.poll_frame(cx);
        };
        let started = clock::now();
        if let Some(handed_out) = state.last_frame_at.take() {
            let transfer = nanos(started.saturating_duration_since(handed_out));
            state.request.transfer_ns = state.request.transfer_ns.saturating_add(transfer);
        }
        let inner = &mut this.inner;
        let (mut result, ended) = state.request.clock.poll(cx, started, |cx| inner.as_mut().poll_frame(cx));
        let Poll::Ready(frame) = &mut result else {
            return Poll::Pending;
        };
        let ended_with = match frame {
            None => Some(state.error),
            Some(Err(_)) => Some(true),
            Some(Ok(frame)) => match frame.trailers_mut() {
                Some(trailers) => {
                    if state.trailers_timing {
                        let snapshot = state.request.snapshot(ended);
                        if let Some(value) = state.request.timing_header(&snapshot) {
                            trailers.insert(TIMING_HEADER, value);
                        }
                    }
                    Some(state.error || grpc_server_error(trailers))
                }
                None if this.inner.is_end_stream() => Some(state.error),
                None => {
                    state.last_frame_at = Some(ended);
                    None
                }
            },
        };
        if let Some(error) = ended_with
            && let Some(state) = this.state.take()
        {
            state.request.finish(ended, Outcome { error, cancelled: false });
        }
        result
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.end_reported.store(true, Ordering::Relaxed);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body + std::fmt::Debug> std::fmt::Debug for ServerBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBody").field("inner", &self.inner).field("measuring", &self.state.is_some()).finish()
    }
}
