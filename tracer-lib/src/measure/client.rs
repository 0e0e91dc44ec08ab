//! The client layer: measures each outbound call, tags it with `rootscale-caller`, reads the callee's
//! `rootscale-timing` (head or gRPC trailers) and attributes the call to the request that made it.
//!
//! [`TraceClient`] starts the call's clock and registers it with the current request (found through the thread's
//! current-request slot); [`CallFuture`] waits for the response head; [`CallBody`] ends the call when the response
//! body ends or is dropped, so `client_total` covers the whole response, as the callee's timing does.

use std::{
    borrow::Cow,
    cell::RefCell,
    future::Future,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    thread::LocalKey,
    time::Duration,
};

use http::{HeaderMap, Request, Response, uri::Authority};
use http_body::{Body, Frame, SizeHint};
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    aggregate::CallSample,
    measure::{
        clock::{self, Instant},
        context::{Current, RequestContext, current},
        grpc::{GrpcHead, grpc_server_error},
        headers::{CALLER_HEADER, MAX_SERVICE_NAME, TIMING_HEADER, Timing, WaitPointRef},
        record::{CallRecord, Wait, micros},
        reuse::{Reused, Spares, Travelling},
    },
    tracer::Tracer,
};

/// Measures every call made through the wrapped client. Made by [`Tracer::client_layer`].
#[derive(Clone, Debug)]
pub struct ClientLayer {
    tracer: Tracer,
    callee: Callee,
    send_caller: bool,
    /// Calls made outside any request are on behalf of one that could not be named (see [`ClientLayer::untied_calls`]).
    untied: bool,
}

/// How calls are named when the response does not name its service.
#[derive(Clone, Debug)]
enum Callee {
    /// Given with [`ClientLayer::callee`].
    Named(Arc<str>),
    /// Learned from the first timing header seen by this layer. Used for requests without an authority (tonic
    /// builds its request URIs without one); others fall back to their `host-port`.
    Learned(Arc<OnceLock<Arc<str>>>),
}

impl ClientLayer {
    pub(crate) fn new(tracer: Tracer) -> Self {
        Self { tracer, callee: Callee::Learned(Arc::default()), send_caller: true, untied: false }
    }

    /// The name to record calls under when the response does not say (an un-instrumented callee, a transport
    /// error). Recommended for a client that talks to one service, such as a tonic channel.
    pub fn callee(mut self, name: &str) -> Result<Self, crate::Error> {
        if !crate::measure::headers::valid_service_name(name) {
            return Err(crate::Error::InvalidServiceName(name.to_string()));
        }
        self.callee = Callee::Named(name.into());
        Ok(self)
    }

    /// Whether to send `rootscale-caller` (this service's name and agent address) on outbound requests (default
    /// yes). Turn it off on clients that call third parties, so they do not learn internal names and addresses.
    pub fn send_caller(mut self, send: bool) -> Self {
        self.send_caller = send;
        self
    }

    /// Marks calls made while no request is current as made for a request this service could not name, rather
    /// than for none (a background job's): the sidecar's calls from an application that does not pass the trace
    /// context on. The window counts them apart, and the decision estimates the service's own wait from the
    /// window's totals instead of per request (docs/DESIGN.md §1.8).
    pub fn untied_calls(mut self) -> Self {
        self.untied = true;
        self
    }
}

impl<S> Layer<S> for ClientLayer {
    type Service = TraceClient<S>;

    fn layer(&self, inner: S) -> TraceClient<S> {
        TraceClient { inner, layer: self.clone() }
    }
}

/// The service made by [`ClientLayer`].
#[derive(Clone, Debug)]
pub struct TraceClient<S> {
    inner: S,
    layer: ClientLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TraceClient<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<CallBody<ResBody>>;
    type Error = S::Error;
    type Future = CallFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // Made only for a measured call: a left-out one clones nothing.
        let fallback = || match (&self.layer.callee, request.uri().authority()) {
            (Callee::Named(name), _) => Fallback::Named(name.clone()),
            (Callee::Learned(_), Some(authority)) => Fallback::Authority(authority.clone()),
            (Callee::Learned(learned), None) => Fallback::Learned(learned.clone()),
        };
        let tracer = &self.layer.tracer;
        let call = Call::start(tracer, fallback, self.layer.untied);
        if self.layer.send_caller {
            // A call left out of the sample still names its caller, marked so the callee leaves it out too.
            let window = call.as_ref().map_or_else(|| tracer.proof_window(), |call| call.proof_window);
            request
                .headers_mut()
                .insert(CALLER_HEADER, tracer.caller_header(window, call.as_ref().map(|call| call.weight)));
        }
        CallFuture { inner: self.inner.call(request), call: call.map(Reused::new) }
    }
}

thread_local! {
    static SPARE_CALLS: Spares<Call> = const { RefCell::new(Vec::new()) };
}

/// A call travels boxed in its response future and body (see [`crate::measure::reuse`]).
impl Travelling for Call {
    fn spares() -> &'static LocalKey<Spares<Self>> {
        &SPARE_CALLS
    }
}

/// Ends a travelling call at `at`, where it lies in its box.
fn finish(call: Reused<Call>, at: Instant, error: bool) {
    call.end(|call| call.finish(at, error));
}

/// What to call the callee when its response does not say.
enum Fallback {
    Named(Arc<str>),
    Authority(Authority),
    Learned(Arc<OnceLock<Arc<str>>>),
}

/// A valid service name for an authority: `host-port`, other characters mapped to `-`, at most 63 long.
fn authority_name(authority: &Authority) -> String {
    let mut name: String = authority
        .host()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .collect();
    if let Some(port) = authority.port_u16() {
        name.push('-');
        name.push_str(&port.to_string());
    }
    name.truncate(MAX_SERVICE_NAME);
    if name.is_empty() { "unknown".to_string() } else { name }
}

/// One outbound call in flight.
pub(crate) struct Call {
    tracer: Tracer,
    request: Option<Arc<RequestContext>>,
    started: Instant,
    fallback: Fallback,
    timing: Option<Timing>,
    /// When the response head arrived, if the timing came with it (plain HTTP): the callee's `total` ends at its
    /// head, so the link's time is measured to the head too, not to the end of a possibly streamed body.
    timing_head_at: Option<Instant>,
    /// The window the call's membership proofs are for: its caller header's, and the callee timing's it checks.
    proof_window: u64,
    error: bool,
    malformed_timing: bool,
    /// Made for a request that could not be named: counted in the window's untied calls.
    untied: bool,
    /// How many calls this one stands for: its request's weight, or its own draw's outside any request.
    weight: u32,
}

impl Call {
    /// Starts measuring a call, unless it is left out of the sample: made for a request that is, or, outside any
    /// request, by its own draw.
    fn start(tracer: &Tracer, fallback: impl FnOnce() -> Fallback, untied: bool) -> Option<Self> {
        // Read once it is known to be measured: a left-out call reads no clock (but one outside any request, whose
        // choice needs the window it starts in).
        let (request, weight, started) = match current() {
            Some(Current::Measured(request)) => {
                let weight = request.weight;
                (Some(request), weight, clock::now())
            }
            Some(Current::Unsampled) => return None,
            None => {
                let now = clock::now();
                (None, tracer.choose(now)?, now)
            }
        };
        let untied = untied && request.is_none();
        if let Some(request) = &request {
            request.call_started(started);
        }
        Some(Self {
            proof_window: tracer.proof_window(),
            tracer: tracer.clone(),
            request,
            started,
            fallback: fallback(),
            timing: None,
            timing_head_at: None,
            error: false,
            malformed_timing: false,
            untied,
            weight,
        })
    }

    /// A call to a wrapped, non-HTTP dependency (`None`: left out of the sample).
    pub(crate) fn start_named(tracer: &Tracer, name: &Arc<str>) -> Option<Self> {
        Self::start(tracer, || Fallback::Named(name.clone()), false)
    }

    /// Takes the timing header from a response head or trailers; a later one (trailers) wins. Returns whether one
    /// was taken.
    fn read_timing(&mut self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(TIMING_HEADER) else {
            return false;
        };
        match self.tracer.read_timing(value, self.proof_window) {
            Ok(Some(timing)) => {
                if let Fallback::Learned(learned) = &self.fallback
                    && learned.get().is_none()
                {
                    let _ = learned.set(timing.service().into());
                }
                self.timing = Some(timing);
                true
            }
            // A responder that cannot prove membership is taken as an uninstrumented callee: its numbers and the
            // address it names are not believed, so nothing is ever dialled on its word (docs/DESIGN.md §1.6).
            Ok(None) => false,
            Err(error) => {
                self.malformed_timing = true;
                tracing::debug!(%error, "ignoring malformed rootscale-timing header");
                false
            }
        }
    }

    fn callee(&self) -> Cow<'_, str> {
        match (&self.timing, &self.fallback) {
            (Some(timing), _) => Cow::Borrowed(timing.service()),
            (None, Fallback::Named(name)) => Cow::Borrowed(name),
            (None, Fallback::Authority(authority)) => Cow::Owned(authority_name(authority)),
            (None, Fallback::Learned(learned)) => Cow::Borrowed(learned.get().map_or("unknown", |name| name)),
        }
    }

    /// Ends the call at `at`.
    pub(crate) fn finish(&self, at: Instant, error: bool) {
        let error = error || self.error;
        let shared = &self.tracer.shared;
        let client_total_us = micros(at.saturating_duration_since(self.started));
        let callee = self.callee();
        let callee = callee.as_ref();
        let (remote_total_us, net_wait_us, remote_point, remote_wait_us) = match &self.timing {
            Some(timing) => {
                let link_us = match self.timing_head_at {
                    Some(head_at) => micros(head_at.saturating_duration_since(self.started)),
                    None => client_total_us,
                };
                (
                    Some(timing.total_us),
                    Some(link_us.saturating_sub(timing.total_us)),
                    timing.wait_point(),
                    timing.wait_us,
                )
            }
            // An un-instrumented callee: all of the call was spent waiting on it.
            None => (None, None, WaitPointRef::Local(callee), client_total_us),
        };
        // What this call adds to the request's largest wait if it is on the critical path: the link or the
        // callee's subtree, whichever waited longer.
        let (candidate_point, candidate_us) = match net_wait_us {
            Some(net_us) if net_us > remote_wait_us => {
                (WaitPointRef::Net { from: &shared.service, to: callee }, net_us)
            }
            _ => (remote_point, remote_wait_us),
        };
        let critical = match &self.request {
            Some(request) => {
                request.call_finished(at, candidate_us, || Wait { point: candidate_point.to_owned(), us: candidate_us })
            }
            None => false,
        };
        shared.aggregator.record_call(
            shared.aggregator.clock().window_at(at),
            &CallSample {
                callee,
                callee_agent: self.timing.as_ref().and_then(Timing::agent),
                client_total_us,
                remote_total_us,
                net_wait_us,
                remote_wait: (remote_point, remote_wait_us),
                critical,
                error,
                untied: self.untied,
                weight: u64::from(self.weight),
            },
        );
        if let Some(observer) = &shared.observer {
            observer.on_call(&CallRecord {
                callee: callee.into(),
                client_total: Duration::from_micros(client_total_us),
                remote_total: remote_total_us.map(Duration::from_micros),
                net_wait: net_wait_us.map(Duration::from_micros),
                remote_wait: Wait { point: remote_point.to_owned(), us: remote_wait_us },
                critical,
                error,
                malformed_timing: self.malformed_timing,
                weight: self.weight,
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`TraceClient`].
    pub struct CallFuture<F> {
        #[pin]
        inner: F,
        call: Option<Reused<Call>>,
    }

    impl<F> PinnedDrop for CallFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Cancelled before the response head arrived.
            if let Some(call) = this.project().call.take() {
                finish(call, clock::now(), true);
            }
        }
    }
}

impl<F, ResBody, E> Future for CallFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<CallBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let Some(mut boxed) = this.call.take() else {
            return Poll::Ready(result.map(|response| response.map(CallBody::passthrough)));
        };
        match result {
            Ok(response) => {
                if let Some(call) = boxed.get_mut() {
                    // The head's arrival: the end of the link's time, and the instant the proof is checked at.
                    if call.read_timing(response.headers()) {
                        call.timing_head_at = Some(clock::now());
                    }
                    call.error |=
                        response.status().is_server_error() || GrpcHead::of(response.headers()).server_error();
                }
                Poll::Ready(Ok(response.map(|body| CallBody::new(body, boxed))))
            }
            Err(error) => {
                finish(boxed, clock::now(), true);
                Poll::Ready(Err(error))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The response body of [`TraceClient`]: ends the call when it ends or is dropped.
    pub struct CallBody<B> {
        #[pin]
        inner: B,
        call: Option<Reused<Call>>,
        end_reported: AtomicBool,
    }

    impl<B> PinnedDrop for CallBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Dropped before its end (or never read, which is the caller's choice): the call is over. Not the
            // callee's error.
            if let Some(call) = this.call.take() {
                finish(call, clock::now(), false);
            }
        }
    }
}

impl<B> CallBody<B> {
    fn passthrough(inner: B) -> Self {
        Self { inner, call: None, end_reported: AtomicBool::new(false) }
    }

    fn new(inner: B, call: Reused<Call>) -> Self {
        Self { inner, call: Some(call), end_reported: AtomicBool::new(false) }
    }
}

impl<B: Body> Body for CallBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let Some(call) = this.call.as_mut().and_then(Reused::get_mut) else {
            return Poll::Ready(frame);
        };
        let now = clock::now();
        let ended_with_error = match &frame {
            None => Some(false),
            Some(Err(_)) => Some(true),
            Some(Ok(frame)) => match frame.trailers_ref() {
                Some(trailers) => {
                    call.read_timing(trailers);
                    Some(grpc_server_error(trailers))
                }
                None if this.inner.is_end_stream() => Some(false),
                None => None,
            },
        };
        // Taken out before it is finished, so that an observer's panic cannot leave it to be finished again on drop.
        if let Some(error) = ended_with_error
            && let Some(call) = this.call.take()
        {
            finish(call, now, error);
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

impl<B: std::fmt::Debug> std::fmt::Debug for CallBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallBody").field("inner", &self.inner).field("in_flight", &self.call.is_some()).finish()
    }
}
