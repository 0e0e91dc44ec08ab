//! Added time per request of the server and client layers, against the same service without them.
//!
//! The inner services answer at once, and futures and bodies are polled by hand with a no-op waker, so what is
//! left is the layers' own work: reading headers, the poll clock, the timing header, the body wrapper and the
//! window record. Each layer is measured three ways in one run: bare, with rootscale, and with rootscale and a mesh
//! key (the membership proof: a signed caller header per window, a checked proof per request from the cache).
//! Run: `cargo bench -p rootscale-tracer --bench layer_overhead`.

use std::{
    convert::Infallible,
    future::Future,
    hint::black_box,
    pin::pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request, Response, header::CONTENT_TYPE};
use http_body::Body;
use http_body_util::Full;
use rootscale_tracer::{
    CALLER_HEADER, TIMING_HEADER, Tracer,
    identity::{KeyRing, MeshKeys},
};
use tower::{Layer, Service, service_fn};

/// Polls a future that is ready at once.
fn ready_now<F: Future>(future: F) -> F::Output {
    let mut context = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut context) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("benchmark services answer at once"),
    }
}

/// Reads a body to its end, as hyper would.
fn drain<B: Body>(body: B) {
    let mut context = Context::from_waker(Waker::noop());
    let mut body = pin!(body);
    while !body.is_end_stream() {
        match body.as_mut().poll_frame(&mut context) {
            Poll::Ready(Some(Ok(frame))) => drop(black_box(frame)),
            Poll::Ready(None) => break,
            _ => panic!("benchmark bodies are ready at once"),
        }
    }
}

/// A hello-world response, with the content type every real handler sets.
fn hello_response() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"hello")));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn hello(_request: Request<Full<Bytes>>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    std::future::ready(Ok(hello_response()))
}

fn request(caller: &HeaderValue) -> Request<Full<Bytes>> {
    let mut request = Request::get("http://svc-b/").body(Full::new(Bytes::new())).unwrap();
    request.headers_mut().insert(CALLER_HEADER, caller.clone());
    request
}

fn round_trip<S>(service: &mut S, caller: &HeaderValue)
where
    S: Service<Request<Full<Bytes>>>,
    S::Response: IntoBody,
    S::Error: std::fmt::Debug,
{
    let response = ready_now(service.call(request(caller))).unwrap();
    response.drain();
}

trait IntoBody {
    fn drain(self);
}

impl<B: Body> IntoBody for Response<B> {
    fn drain(self) {
        drain(self.into_body());
    }
}

/// A tracer; with `keys`, a member of the mesh. The window is an hour, so proofs made at the start stay current.
fn tracer(service: &str, agent: &str, keys: Option<&Arc<KeyRing>>) -> Tracer {
    let builder = Tracer::builder(service).agent_addr(agent).window(Duration::from_secs(3600));
    match keys {
        Some(keys) => builder.mesh_keys(keys.clone()),
        None => builder,
    }
    .build()
    .unwrap()
}

/// The header `layer` adds to what it wraps: the caller header a client sends, or the timing header a server
/// answers a member with.
fn header_written_by<S>(mut service: S, name: http::HeaderName, caller: Option<HeaderValue>) -> HeaderValue
where
    S: Service<Request<Full<Bytes>>>,
    S::Response: HeaderOf,
    S::Error: std::fmt::Debug,
{
    let mut request = Request::get("http://svc-b/").body(Full::new(Bytes::new())).unwrap();
    if let Some(caller) = caller {
        request.headers_mut().insert(CALLER_HEADER, caller);
    }
    ready_now(service.call(request)).unwrap().header(&name)
}

trait HeaderOf {
    fn header(self, name: &http::HeaderName) -> HeaderValue;
}

impl<B: Body> HeaderOf for Response<B> {
    fn header(self, name: &http::HeaderName) -> HeaderValue {
        self.headers().get(name).cloned().expect("the layer wrote the header")
    }
}

fn layers(c: &mut Criterion) {
    let keys =
        Arc::new(KeyRing::fixed(MeshKeys::parse("bench-mesh-key-0123456789abcdefghijklmnopqrstuvwxyz").unwrap()));
    let plain = tracer("svc-b", "127.0.0.8:9797", None);
    let keyed = tracer("svc-b", "127.0.0.8:9797", Some(&keys));
    // What members send: svc-a's signed caller header (captured from its client layer), svc-c's signed timing.
    let echo = service_fn(|request: Request<Full<Bytes>>| {
        let mut response = Response::new(Full::new(Bytes::new()));
        if let Some(caller) = request.headers().get(CALLER_HEADER) {
            response.headers_mut().insert(CALLER_HEADER, caller.clone());
        }
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let caller = tracer("svc-a", "127.0.0.7:9797", Some(&keys)).client_layer().layer(echo);
    let signed_caller = header_written_by(caller, CALLER_HEADER, None);
    let callee = tracer("svc-c", "127.0.0.9:9797", Some(&keys)).server_layer().layer(service_fn(hello));
    let signed_timing = header_written_by(callee, TIMING_HEADER, Some(signed_caller.clone()));

    let mut group = c.benchmark_group("server");
    let mut bare = service_fn(hello);
    group.bench_function("bare", |b| b.iter(|| round_trip(&mut bare, &signed_caller)));
    let mut traced = plain.server_layer().layer(service_fn(hello));
    let unsigned = HeaderValue::from_static("s=svc-a;a=127.0.0.7:9797");
    group.bench_function("rootscale", |b| b.iter(|| round_trip(&mut traced, &unsigned)));
    let mut proved = keyed.server_layer().layer(service_fn(hello));
    group.bench_function("rootscale+key", |b| b.iter(|| round_trip(&mut proved, &signed_caller)));
    group.finish();

    let mut group = c.benchmark_group("client");
    let timed = |timing: HeaderValue| {
        service_fn(move |_request: Request<Full<Bytes>>| {
            let mut response = hello_response();
            response.headers_mut().insert(TIMING_HEADER, timing.clone());
            std::future::ready(Ok::<_, Infallible>(response))
        })
    };
    let unsigned_timing = HeaderValue::from_static("v=1;s=svc-c;t=41873;w=40211;k=l;at=svc-c;a=127.0.0.9:9797");
    let mut bare = timed(signed_timing.clone());
    group.bench_function("bare", |b| b.iter(|| round_trip(&mut bare, &signed_caller)));
    let mut traced = plain.client_layer().layer(timed(unsigned_timing));
    group.bench_function("rootscale", |b| b.iter(|| round_trip(&mut traced, &unsigned)));
    let mut proved = keyed.client_layer().layer(timed(signed_timing));
    group.bench_function("rootscale+key", |b| b.iter(|| round_trip(&mut proved, &signed_caller)));
    group.finish();
    // Every proof was believed: a refused one would measure the refusal, not the membership.
    let refused: u64 = [&keyed]
        .iter()
        .filter_map(|tracer| tracer.rejections())
        .map(|counts| {
            use rootscale_tracer::identity::{HeaderRole, Rejection};
            [HeaderRole::Caller, HeaderRole::Timing]
                .into_iter()
                .flat_map(|role| Rejection::ALL.map(|reason| counts.get(role, reason)))
                .sum::<u64>()
        })
        .sum();
    assert_eq!(refused, 0, "the benchmark's proofs were refused");
    // Close the windows the benchmark filled, so nothing is dropped as unclosed.
    for tracer in [&plain, &keyed] {
        let now = tracer.window_clock().window_id(std::time::Instant::now());
        black_box(tracer.close_window(now).map(|window| window.stats.requests));
    }
}

criterion_group!(benches, layers);
criterion_main!(benches);
