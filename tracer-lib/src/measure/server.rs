//! The server layer: measures each request a service handles, answers with `rootscale-timing`, and records the
//! request into its window.
//!
//! Shape (after linkerd's `http/prom` layers): [`TraceServer`] reads the caller header in `call`;
//! [`ServerFuture`] polls the handler through a [`PollClock`] (busy, cpu_wait) with the request installed as a
//! task-local, and when the response head is ready wraps its body in [`ServerBody`], which records the request
//! when the body ends or is dropped. For gRPC the timing goes into the trailers, written when the body ends; for
//! plain HTTP it goes into the response head.
//!
//! Generic over request and response bodies, so the same layer works on axum routers, tonic servers and hyper
//! services. Nothing here can fail a request: bad headers are counted and ignored.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
    task::{Context, Poll, ready},
    time::Instant,
};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, header::CONTENT_TYPE};
use http_body::{Body, Frame, SizeHint};
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    aggregate::RequestSample,
    measure::{
        context::{PollClock, RequestContext},
        headers::{CALLER_HEADER, CallerHeader, TIMING_HEADER},
        record::{RequestRecord, Wait, micros},
    },
    tracer::Tracer,
};

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

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
        TraceServer {
            inner,
            tracer: self.tracer.clone(),
        }
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
{
    type Response = Response<ServerBody<ResBody>>;
    type Error = S::Error;
    type Future = ServerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let caller = request
            .headers()
            .get(CALLER_HEADER)
            .and_then(|value| match CallerHeader::parse(value) {
                Ok(caller) => Some(caller),
                Err(error) => {
                    self.tracer.count_malformed_caller();
                    tracing::debug!(%error, "ignoring malformed rootscale-caller header");
                    None
                }
            });
        ServerFuture {
            inner: self.inner.call(request),
            request: Some(Measurement {
                tracer: self.tracer.clone(),
                caller,
                clock: None,
            }),
        }
    }
}

/// What is known about a request while it is served.
struct Measurement {
    tracer: Tracer,
    caller: Option<CallerHeader>,
    /// Set at the first poll, when `total` starts.
    clock: Option<PollClock>,
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
    largest: Largest,
    largest_us: u64,
}

impl Measurement {
    /// The request's clock; `total` starts at `now` if this is the first poll.
    fn clock(&mut self, now: Instant) -> &mut PollClock {
        self.clock
            .get_or_insert_with(|| PollClock::new(RequestContext::new(now)))
    }

    fn snapshot(&mut self, at: Instant) -> Snapshot {
        let clock = self.clock(at);
        let context = clock.context();
        let total = at.saturating_duration_since(context.start);
        let (downstream, critical_wait) = context.downstream_until(at);
        let local_wait_us = micros(total.saturating_sub(downstream).saturating_sub(clock.busy));
        let (largest, largest_us) = match critical_wait {
            Some(critical) if critical.us > local_wait_us => {
                let us = critical.us;
                (Largest::Call(critical), us)
            }
            _ => (Largest::Own, local_wait_us),
        };
        Snapshot {
            total_us: micros(total),
            busy_us: micros(clock.busy),
            cpu_wait_us: micros(clock.cpu_wait),
            downstream_us: micros(downstream),
            local_wait_us,
            largest,
            largest_us,
        }
    }

    fn timing_header(&self, snapshot: &Snapshot) -> Option<HeaderValue> {
        let point = match &snapshot.largest {
            Largest::Own => None,
            Largest::Call(wait) => Some(wait.point.as_ref()),
        };
        self.tracer
            .shared
            .timing_encoder
            .encode(snapshot.total_us, snapshot.largest_us, point)
    }

    /// Records the request as ended at `at`.
    fn finish(mut self, at: Instant, error: bool) {
        let snapshot = self.snapshot(at);
        let shared = &self.tracer.shared;
        let caller = self.caller.as_ref().map(|c| (c.service(), c.agent()));
        shared.aggregator.record_request(
            shared.aggregator.clock().window_id(at),
            &RequestSample {
                caller,
                total_us: snapshot.total_us,
                busy_us: snapshot.busy_us,
                cpu_wait_us: snapshot.cpu_wait_us,
                downstream_us: snapshot.downstream_us,
                local_wait_us: snapshot.local_wait_us,
                error,
            },
        );
        if let Some(observer) = &shared.observer {
            use std::time::Duration;
            observer.on_request(&RequestRecord {
                caller: caller.map(|(service, _)| service.to_string()),
                total: Duration::from_micros(snapshot.total_us),
                busy: Duration::from_micros(snapshot.busy_us),
                cpu_wait: Duration::from_micros(snapshot.cpu_wait_us),
                downstream: Duration::from_micros(snapshot.downstream_us),
                local_wait: Duration::from_micros(snapshot.local_wait_us),
                largest_wait: match snapshot.largest {
                    Largest::Own => Wait {
                        point: shared.local_point.clone(),
                        us: snapshot.largest_us,
                    },
                    Largest::Call(wait) => wait,
                },
                error,
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`TraceServer`].
    pub struct ServerFuture<F> {
        #[pin]
        inner: F,
        request: Option<Measurement>,
    }

    impl<F> PinnedDrop for ServerFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before the response was ready: the client went away or a timeout fired.
            if let Some(request) = this.project().request.take() && request.clock.is_some() {
                request.finish(Instant::now(), true);
            }
        }
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

fn grpc_failed(headers: &HeaderMap) -> bool {
    headers.get(GRPC_STATUS).is_some_and(|status| status.as_bytes() != b"0")
}

impl<F, ResBody, E> Future for ServerFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ServerBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(request) = this.request.as_mut() else {
            // Polled after completion: let the inner future decide what that means.
            return match ready!(this.inner.poll(cx)) {
                Ok(response) => Poll::Ready(Ok(response.map(ServerBody::passthrough))),
                Err(error) => Poll::Ready(Err(error)),
            };
        };
        let started = Instant::now();
        let (result, ended) = request
            .clock(started)
            .poll(cx, started, |cx| this.inner.as_mut().poll(cx));
        let Poll::Ready(result) = result else {
            return Poll::Pending;
        };
        let Some(mut request) = this.request.take() else {
            return Poll::Pending; // unreachable: checked above
        };
        match result {
            Ok(mut response) => {
                // gRPC sends its status in trailers, after the body: so does the timing. A trailers-only gRPC
                // response (an error) has its status in the head, and the timing goes there too.
                // Timing goes only to instrumented callers (who named themselves), unless configured otherwise:
                // an entry service does not tell the outside world its internal service names and timings.
                let send_timing = request.caller.is_some() || request.tracer.shared.timing_for_everyone;
                let deferred = is_grpc(response.headers()) && !response.headers().contains_key(GRPC_STATUS);
                let error = response.status().is_server_error() || grpc_failed(response.headers());
                if send_timing && !deferred {
                    let snapshot = request.snapshot(ended);
                    if let Some(value) = request.timing_header(&snapshot) {
                        response.headers_mut().insert(TIMING_HEADER, value);
                    }
                }
                let state = BodyState {
                    request,
                    trailers_timing: send_timing && deferred,
                    error,
                };
                Poll::Ready(Ok(response.map(|body| ServerBody::new(body, state))))
            }
            Err(error) => {
                request.finish(ended, true);
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
}

pin_project_lite::pin_project! {
    /// The response body of [`TraceServer`]: records the request when it ends or is dropped.
    pub struct ServerBody<B> {
        #[pin]
        inner: B,
        request: Option<BodyState>,
        // Set when the inner body reported its end through `is_end_stream` (hyper then drops it unpolled).
        end_reported: AtomicBool,
    }

    impl<B> PinnedDrop for ServerBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(state) = this.request.take() {
                let aborted = !this.end_reported.load(Ordering::Relaxed);
                state.request.finish(Instant::now(), state.error || aborted);
            }
        }
    }
}

impl<B> ServerBody<B> {
    fn passthrough(inner: B) -> Self {
        Self {
            inner,
            request: None,
            end_reported: AtomicBool::new(false),
        }
    }

    fn new(inner: B, state: BodyState) -> Self {
        Self {
            inner,
            request: Some(state),
            end_reported: AtomicBool::new(false),
        }
    }
}

impl<B: Body> Body for ServerBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let mut frame = ready!(this.inner.as_mut().poll_frame(cx));
        let Some(mut state) = this.request.take() else {
            return Poll::Ready(frame);
        };
        let now = Instant::now();
        match &mut frame {
            None => state.request.finish(now, state.error),
            Some(Err(_)) => state.request.finish(now, true),
            Some(Ok(frame)) => match frame.trailers_mut() {
                Some(trailers) => {
                    if state.trailers_timing {
                        let snapshot = state.request.snapshot(now);
                        if let Some(value) = state.request.timing_header(&snapshot) {
                            trailers.insert(TIMING_HEADER, value);
                        }
                    }
                    let error = state.error || grpc_failed(trailers);
                    state.request.finish(now, error);
                }
                None if this.inner.is_end_stream() => state.request.finish(now, state.error),
                None => *this.request = Some(state),
            },
        }
        Poll::Ready(frame)
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

impl<B: std::fmt::Debug> std::fmt::Debug for ServerBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBody")
            .field("inner", &self.inner)
            .field("measuring", &self.request.is_some())
            .finish()
    }
}
