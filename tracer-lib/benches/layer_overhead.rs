//! Added time per request of the server and client layers, against the same service without them.
//!
//! The inner services answer at once, and futures and bodies are polled by hand with a no-op waker, so what is
//! left is the layers' own work: reading headers, the poll clock, the timing header, the body wrapper and the
//! window record. Each layer is measured three ways: bare, with rootscale, and with rootscale and a mesh key (the
//! membership proof: a signed caller header per window, a checked proof per request from the cache).
//!
//! First a side-by-side table: rounds in which every variant runs in turn, so a noisy neighbour slows all of them
//! alike; it prints each variant's median and the medians of the per-round differences (what the layer adds, and
//! what the key adds on top). Then criterion's own measurement of each variant.
//!
//! A third group, `in-request`, is a request through the server layer whose handler makes one call through the client
//! layer: the call's bookkeeping inside its request (the request's critical path, its downstream time, its largest
//! wait) is only exercised there. What one call inside a request adds is that group's added cost less the server's.
//! A fourth variant, `rootscale-1in16`, samples one request in 16 (`ROOTSCALE_SAMPLE=1/16`) as a service inside a
//! sampled mesh sees it: its callers send the measured form of their caller header on one request in 16 and the
//! marked `u=1` form on the rest; calls outside a request (the `client` group) are drawn.
//! Last, the heap allocations each variant makes per call, counted by a wrapper around the system allocator
//! (counting only in that pass, so the timed rounds pay one relaxed load per allocation, in every variant alike).
//! Run: `cargo bench -p rootscale-tracer --bench layer_overhead`.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    convert::Infallible,
    future::Future,
    hint::black_box,
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use criterion::Criterion;
use http::{HeaderValue, Request, Response, header::CONTENT_TYPE};
use http_body::Body;
use http_body_util::Full;
use rootscale_tracer::{
    CALLER_HEADER, SampleRate, TIMING_HEADER, Tracer,
    identity::{KeyRing, MeshKeys},
};
use tower::{Layer, Service, service_fn};

/// The system allocator, counting allocations while [`COUNTING`] is set.
struct CountingAllocator;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds `GlobalAlloc`'s contract; the
// only addition is a relaxed atomic load and add, which neither allocates nor touches the memory handed out.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's guarantees for `layout` are passed on as they are.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc`/`realloc` above with this `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's guarantees for `ptr`, `layout` and `new_size` are passed on as they are.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

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

type Hello = Response<Full<Bytes>>;
type Ready<T> = std::future::Ready<Result<T, Infallible>>;

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

/// How many requests in one the sampled variants measure.
const SAMPLE_EVERY: u32 = 16;

/// A tracer; with `keys`, a member of the mesh. The window is an hour, so proofs made at the start stay current.
fn tracer(service: &str, agent: &str, keys: Option<&Arc<KeyRing>>) -> Tracer {
    sampled_tracer(service, agent, keys, SampleRate::ALL)
}

fn sampled_tracer(service: &str, agent: &str, keys: Option<&Arc<KeyRing>>, sample: SampleRate) -> Tracer {
    let builder = Tracer::builder(service).agent_addr(agent).window(Duration::from_secs(3600)).sample(sample);
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

/// One way of serving or calling, run once per call.
struct Variant {
    group: &'static str,
    name: &'static str,
    run: Box<dyn FnMut()>,
}

/// A handler that calls `client` once (its response read to the end) and then answers hello: a service whose
/// request makes one downstream call.
fn calling<C>(
    client: C,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Hello,
    Error = Infallible,
    Future = impl Future<Output = Result<Hello, Infallible>>,
> + Clone
where
    C: Service<Request<Full<Bytes>>> + Clone,
    C::Response: IntoBody,
    C::Error: std::fmt::Debug,
{
    service_fn(move |_request: Request<Full<Bytes>>| {
        let mut client = client.clone();
        async move {
            // With one header already, as real clients' requests carry (reqwest's `accept`, tonic's `te` and
            // `content-type`): the header map is then allocated whatever the layers do, and what is counted is
            // theirs. (Into an empty map, the first insert of any header — ours included — allocates the map.)
            let call = Request::get("http://svc-c/")
                .header(http::header::ACCEPT, HeaderValue::from_static("*/*"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            client.call(call).await.unwrap().drain();
            Ok(hello_response())
        }
    })
}

/// The variant names of each group, in the order they run.
const VARIANTS: [&str; 4] = ["bare", "rootscale", "rootscale+key", "rootscale-1in16"];

/// The twelve variants, and the tracers to check afterwards.
struct Bench {
    variants: Vec<Variant>,
    plain: Tracer,
    keyed: Tracer,
    sampled: Tracer,
}

fn bench() -> Bench {
    let keys =
        Arc::new(KeyRing::fixed(MeshKeys::parse("bench-mesh-key-0123456789abcdefghijklmnopqrstuvwxyz").unwrap()));
    let plain = tracer("svc-b", "127.0.0.8:9797", None);
    let keyed = tracer("svc-b", "127.0.0.8:9797", Some(&keys));
    let sampled = sampled_tracer("svc-b", "127.0.0.8:9797", None, SampleRate::one_in(SAMPLE_EVERY).unwrap());
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
    let unsigned = HeaderValue::from_static("s=svc-a;a=127.0.0.7:9797");
    // A sampled caller's headers: measured on one request in 16 (drawn, so weighed 16), marked left out on the
    // others.
    let unsampled = HeaderValue::from_static("s=svc-a;u=1;a=127.0.0.7:9797");
    let drawn = HeaderValue::from_static("s=svc-a;w=16;a=127.0.0.7:9797");
    let sampled_callers: Vec<HeaderValue> =
        (0..SAMPLE_EVERY).map(|i| if i == 0 { drawn.clone() } else { unsampled.clone() }).collect();
    let unsigned_timing = HeaderValue::from_static("v=1;s=svc-c;t=41873;w=40211;k=l;at=svc-c;a=127.0.0.9:9797");
    fn timed(
        timing: HeaderValue,
    ) -> impl Service<Request<Full<Bytes>>, Response = Hello, Error = Infallible, Future = Ready<Hello>> + Clone {
        service_fn(move |_request: Request<Full<Bytes>>| {
            let mut response = hello_response();
            response.headers_mut().insert(TIMING_HEADER, timing.clone());
            std::future::ready(Ok::<_, Infallible>(response))
        })
    }
    /// Runs `service` with the caller headers in turn (one header: always that one).
    fn cycling<S>(group: &'static str, name: &'static str, mut service: S, callers: Vec<HeaderValue>) -> Variant
    where
        S: Service<Request<Full<Bytes>>> + 'static,
        S::Response: IntoBody,
        S::Error: std::fmt::Debug,
    {
        let mut next = 0;
        Variant {
            group,
            name,
            run: Box::new(move || {
                round_trip(&mut service, &callers[next]);
                next = (next + 1) % callers.len();
            }),
        }
    }
    fn variant<S>(group: &'static str, name: &'static str, service: S, caller: HeaderValue) -> Variant
    where
        S: Service<Request<Full<Bytes>>> + 'static,
        S::Response: IntoBody,
        S::Error: std::fmt::Debug,
    {
        cycling(group, name, service, vec![caller])
    }
    let variants = vec![
        variant("server", "bare", service_fn(hello), signed_caller.clone()),
        variant("server", "rootscale", plain.server_layer().layer(service_fn(hello)), unsigned.clone()),
        variant("server", "rootscale+key", keyed.server_layer().layer(service_fn(hello)), signed_caller.clone()),
        cycling("server", "rootscale-1in16", sampled.server_layer().layer(service_fn(hello)), sampled_callers.clone()),
        variant("client", "bare", timed(signed_timing.clone()), signed_caller.clone()),
        variant("client", "rootscale", plain.client_layer().layer(timed(unsigned_timing.clone())), unsigned.clone()),
        variant(
            "client",
            "rootscale+key",
            keyed.client_layer().layer(timed(signed_timing.clone())),
            signed_caller.clone(),
        ),
        variant(
            "client",
            "rootscale-1in16",
            sampled.client_layer().layer(timed(unsigned_timing.clone())),
            unsigned.clone(),
        ),
        variant("in-request", "bare", calling(timed(signed_timing.clone())), signed_caller.clone()),
        variant(
            "in-request",
            "rootscale",
            plain.server_layer().layer(calling(plain.client_layer().layer(timed(unsigned_timing.clone())))),
            unsigned.clone(),
        ),
        variant(
            "in-request",
            "rootscale+key",
            keyed.server_layer().layer(calling(keyed.client_layer().layer(timed(signed_timing)))),
            signed_caller,
        ),
        cycling(
            "in-request",
            "rootscale-1in16",
            sampled.server_layer().layer(calling(sampled.client_layer().layer(timed(unsigned_timing)))),
            sampled_callers,
        ),
    ];
    Bench { variants, plain, keyed, sampled }
}

impl Bench {
    /// Every proof was believed (a refused one would measure the refusal, not the membership); the windows the
    /// benchmark filled are closed, so nothing is dropped as unclosed.
    fn finish(self) {
        use rootscale_tracer::identity::{HeaderRole, Rejection};
        let counts = self.keyed.rejections().expect("a keyed tracer counts refusals");
        let refused: u64 = [HeaderRole::Caller, HeaderRole::Timing]
            .into_iter()
            .flat_map(|role| Rejection::ALL.map(|reason| counts.get(role, reason)))
            .sum();
        assert_eq!(refused, 0, "the benchmark's proofs were refused");
        for tracer in [&self.plain, &self.keyed, &self.sampled] {
            let now = tracer.window_clock().window_id(std::time::Instant::now());
            black_box(tracer.close_window(now).map(|window| window.stats.requests));
        }
    }
}

fn layers(c: &mut Criterion) {
    let mut bench = bench();
    for group_name in ["server", "client", "in-request"] {
        let mut group = c.benchmark_group(group_name);
        for variant in bench.variants.iter_mut().filter(|variant| variant.group == group_name) {
            group.bench_function(variant.name, |b| b.iter(|| (variant.run)()));
        }
        group.finish();
    }
    bench.finish();
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Rounds of every variant in turn; per variant the median ns per call, per group the median per-round added cost.
fn side_by_side() {
    const ROUNDS: usize = 31;
    const CALLS: u32 = 20_000;
    let mut bench = bench();
    let mut ns: Vec<Vec<f64>> = vec![Vec::with_capacity(ROUNDS); bench.variants.len()];
    for round in 0..=ROUNDS {
        for (index, variant) in bench.variants.iter_mut().enumerate() {
            let start = std::time::Instant::now();
            for _ in 0..CALLS {
                (variant.run)();
            }
            // Round 0 warms caches and the allocator up; it is not counted.
            if round > 0 {
                ns[index].push(start.elapsed().as_nanos() as f64 / f64::from(CALLS));
            }
        }
    }
    println!("side by side: {ROUNDS} rounds of {CALLS} calls per variant, medians");
    println!(
        "| layer | bare ns | rootscale ns | rootscale+key ns | rootscale 1/16 ns | added by rootscale | added by the key \
         | added at 1/16 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let width = VARIANTS.len();
    let diff = |a: usize, b: usize| median(ns[b].iter().zip(&ns[a]).map(|(later, earlier)| later - earlier).collect());
    for (group, first) in [("server", 0), ("client", width), ("in-request", 2 * width)] {
        println!(
            "| {group} | {:.0} | {:.0} | {:.0} | {:.0} | {:+.0} | {:+.0} | {:+.0} |",
            median(ns[first].clone()),
            median(ns[first + 1].clone()),
            median(ns[first + 2].clone()),
            median(ns[first + 3].clone()),
            diff(first, first + 1),
            diff(first + 1, first + 2),
            diff(first, first + 3),
        );
    }
    // The call's own cost inside its request: what the in-request group adds beyond the server layer's.
    for (index, name) in [(1, "rootscale"), (2, "rootscale+key"), (3, "rootscale 1/16")] {
        let (in_request, server) = (diff(2 * width, 2 * width + index), diff(0, index));
        println!(
            "one client call inside a request, {name}: {:+.0} ns (in-request added {in_request:+.0} less server added \
             {server:+.0})",
            in_request - server
        );
    }
    // Allocations per call, in the steady state: after the rounds above, over enough calls that a per-window or
    // amortised allocation rounds away.
    const COUNTED_CALLS: u32 = 10_000;
    println!("heap allocations per call (reallocations included), over {COUNTED_CALLS} calls:");
    println!("| layer | {} |", VARIANTS.join(" | "));
    println!("|---|{}", "---:|".repeat(VARIANTS.len()));
    for (group, variants) in ["server", "client", "in-request"].iter().zip(bench.variants.chunks_mut(width)) {
        let counts: Vec<String> = variants
            .iter_mut()
            .map(|variant| {
                ALLOCATIONS.store(0, Ordering::Relaxed);
                COUNTING.store(true, Ordering::Relaxed);
                for _ in 0..COUNTED_CALLS {
                    (variant.run)();
                }
                COUNTING.store(false, Ordering::Relaxed);
                format!("{:.2}", ALLOCATIONS.load(Ordering::Relaxed) as f64 / f64::from(COUNTED_CALLS))
            })
            .collect();
        println!("| {group} | {} |", counts.join(" | "));
    }
    bench.finish();
}

/// `LAYER_OVERHEAD_ONLY=server/rootscale+key:100000` runs one variant that many times and nothing else: for counting
/// instructions under valgrind's callgrind, which is deterministic where the clock on a shared machine is not
/// (`.ci/overhead-instructions` runs every variant at two counts and prints instructions per call).
fn only(spec: &str) {
    let (variant, calls) = spec.rsplit_once(':').expect("LAYER_OVERHEAD_ONLY=group/name:calls");
    let calls: u32 = calls.parse().expect("a number of calls");
    let mut bench = bench();
    let run = &mut bench
        .variants
        .iter_mut()
        .find(|v| format!("{}/{}", v.group, v.name) == variant)
        .expect("a variant: server|client|in-request / bare|rootscale|rootscale+key|rootscale-1in16")
        .run;
    for _ in 0..calls {
        run();
    }
    bench.finish();
}

fn main() {
    if let Ok(spec) = std::env::var("LAYER_OVERHEAD_ONLY") {
        return only(&spec);
    }
    // Criterion's `--profile-time` (for a profiler) measures one variant alone: no table then.
    if !std::env::args().any(|arg| arg == "--profile-time") {
        side_by_side();
    }
    let mut criterion = Criterion::default().configure_from_args();
    layers(&mut criterion);
    criterion.final_summary();
}
