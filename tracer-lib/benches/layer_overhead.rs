//! Added time per request of the server and client layers, against the same service without them.
//!
//! The inner services answer at once, and futures and bodies are polled by hand with a no-op waker, so what is
//! left is the layers' own work: reading headers, the poll clock, the timing header, the body wrapper and the
//! window record. Run: `cargo bench -p rootscale-tracer --bench layer_overhead`.

use std::{
    convert::Infallible,
    future::Future,
    hint::black_box,
    pin::pin,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request, Response, header::CONTENT_TYPE};
use http_body::Body;
use http_body_util::Full;
use rootscale_tracer::{CALLER_HEADER, TIMING_HEADER, Tracer};
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

fn timed_hello(_request: Request<Full<Bytes>>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    let mut response = hello_response();
    response
        .headers_mut()
        .insert(TIMING_HEADER, HeaderValue::from_static("v=1;s=svc-c;t=41873;w=40211;k=l;at=svc-c;a=10.0.3.9:9797"));
    std::future::ready(Ok(response))
}

fn request() -> Request<Full<Bytes>> {
    let mut request = Request::get("http://svc-b/").body(Full::new(Bytes::new())).unwrap();
    request.headers_mut().insert(CALLER_HEADER, HeaderValue::from_static("s=svc-a;a=10.0.3.7:9797"));
    request
}

fn round_trip<S>(service: &mut S)
where
    S: Service<Request<Full<Bytes>>>,
    S::Response: IntoBody,
    S::Error: std::fmt::Debug,
{
    let response = ready_now(service.call(request())).unwrap();
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

fn layers(c: &mut Criterion) {
    let tracer = Tracer::builder("svc-b").agent_addr("10.0.3.8:9797").build().unwrap();
    let mut group = c.benchmark_group("server");
    let mut bare = service_fn(hello);
    group.bench_function("bare", |b| b.iter(|| round_trip(&mut bare)));
    let mut traced = tracer.server_layer().layer(service_fn(hello));
    group.bench_function("rootscale", |b| b.iter(|| round_trip(&mut traced)));
    group.finish();

    let mut group = c.benchmark_group("client");
    let mut bare = service_fn(timed_hello);
    group.bench_function("bare", |b| b.iter(|| round_trip(&mut bare)));
    let mut traced = tracer.client_layer().layer(service_fn(timed_hello));
    group.bench_function("rootscale", |b| b.iter(|| round_trip(&mut traced)));
    group.finish();
    // Close the windows the benchmark filled, so nothing is dropped as unclosed.
    let now = tracer.window_clock().window_id(std::time::Instant::now());
    black_box(tracer.close_window(now).map(|window| window.stats.requests));
}

criterion_group!(benches, layers);
criterion_main!(benches);
