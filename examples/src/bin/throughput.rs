//! Side-by-side throughput of an axum hello-world: bare, behind rootscale's server layer (every request measured
//! and aggregated), and with an OpenTelemetry span per request (tower-http's `TraceLayer` → tracing →
//! tracing-opentelemetry → the OpenTelemetry SDK's batch span processor → an in-process exporter that counts).
//!
//! One command, one run, one load generator: the server runs on its own thread (a single-threaded runtime, so
//! it gets one core), the closed-loop load generator on another, and the three variants take turns round by
//! round so drift on a shared machine hits all of them alike. Prints each round, the medians and the ratios.
//!
//! By default every request carries a `rootscale-caller` header, as a request from an instrumented neighbour does,
//! so rootscale does all its per-request work: parse the caller, record the inbound edge, and answer with a
//! `rootscale-timing` header. `--external` sends plain requests instead (an entry service's traffic from outside).
//! All variants get the same requests.
//!
//! `cargo run --release -p rootscale-examples --features otel-bench --bin throughput -- [--rounds 5] [--seconds 3]
//! [--connections 32] [--external]`
//!
//! `--serve bare|rootscale|open-telemetry` only serves one variant on its one thread and prints `listening on ADDR`,
//! for an outside load generator (`scripts/wrk-throughput` runs wrk against it).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter},
};
use rootscale_tracer::{SampleRate, Tracer};
use tracing_subscriber::layer::SubscriberExt as _;

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum Variant {
    Bare,
    Rootscale,
    OpenTelemetry,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Bare, Variant::Rootscale, Variant::OpenTelemetry];

    fn name(self) -> &'static str {
        match self {
            Variant::Bare => "bare",
            Variant::Rootscale => "rootscale",
            Variant::OpenTelemetry => "opentelemetry",
        }
    }
}

/// Counts exported spans, so the batch processor does all its usual work and the spans go somewhere.
#[derive(Debug)]
struct CountingExporter(Arc<AtomicU64>);

impl SpanExporter for CountingExporter {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        std::future::ready(Ok(()))
    }
}

struct Server {
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    /// Requests the variant saw by its own count (rootscale windows or exported spans).
    instrumented: Arc<AtomicU64>,
}

fn hello_router() -> Router {
    Router::new().route("/", get(|| async { "hello, world" }))
}

fn start_server(variant: Variant, sample: SampleRate) -> Server {
    let (addr_sender, addr_receiver) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let instrumented = Arc::new(AtomicU64::new(0));
    let (thread_stop, thread_count) = (stop.clone(), instrumented.clone());
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        // The OpenTelemetry pipeline is installed for this server thread only.
        let mut otel = None;
        let mut rootscale = None;
        let router = match variant {
            Variant::Bare => hello_router(),
            Variant::Rootscale => {
                let tracer = Tracer::builder("hello").sample(sample).build().expect("tracer");
                let first_window = tracer.window_clock().window_id(Instant::now());
                rootscale = Some((tracer.clone(), first_window));
                hello_router().layer(tracer.server_layer())
            }
            Variant::OpenTelemetry => {
                let provider = SdkTracerProvider::builder()
                    .with_span_processor(BatchSpanProcessor::builder(CountingExporter(thread_count.clone())).build())
                    .build();
                let subscriber = tracing_subscriber::registry()
                    .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("hello")));
                otel = Some((tracing::subscriber::set_default(subscriber), provider));
                hello_router().layer(tower_http::trace::TraceLayer::new_for_http())
            }
        };
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addr_sender.send(listener.local_addr().expect("addr")).expect("send addr");
            let server = tokio::spawn(async move { axum::serve(listener, router).await });
            while !thread_stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            server.abort();
        });
        // Close the run's windows (as an agent's window closer would) and count what they aggregated.
        if let Some((tracer, first_window)) = rootscale {
            let last_window = tracer.window_clock().window_id(Instant::now());
            for window in first_window..=last_window {
                if let Some(closed) = tracer.close_window(window) {
                    thread_count.fetch_add(closed.stats.requests, Ordering::Relaxed);
                }
            }
        }
        if let Some((guard, provider)) = otel {
            let _ = provider.force_flush();
            drop(guard);
            let _ = provider.shutdown();
        }
    });
    let addr = addr_receiver.recv().expect("server address");
    Server { addr, stop, thread, instrumented }
}

/// Closed-loop load from `connections` keep-alive HTTP/1.1 connections for `warm_up + seconds`; returns the
/// responses per second after the warm-up.
fn drive(addr: std::net::SocketAddr, connections: usize, warm_up: Duration, seconds: Duration, caller: bool) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let counted = Arc::new(AtomicU64::new(0));
        let measuring = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (counted, measuring, done) = (counted.clone(), measuring.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
                stream.set_nodelay(true).expect("nodelay");
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
                tokio::spawn(connection);
                while !done.load(Ordering::Relaxed) {
                    let mut request = http::Request::get("/")
                        .header(http::header::HOST, "localhost")
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    if caller {
                        request.headers_mut().insert(
                            rootscale_tracer::CALLER_HEADER,
                            http::HeaderValue::from_static("s=loadgen;a=127.0.0.1:9797"),
                        );
                    }
                    let response = sender.send_request(request).await.expect("response");
                    response.into_body().collect().await.expect("body");
                    if measuring.load(Ordering::Relaxed) {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        tokio::time::sleep(warm_up).await;
        measuring.store(true, Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(seconds).await;
        let count = counted.load(Ordering::Relaxed);
        let elapsed = started.elapsed();
        done.store(true, Ordering::Relaxed);
        for task in tasks {
            let _ = task.await;
        }
        count as f64 / elapsed.as_secs_f64()
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Side-by-side throughput: bare axum, rootscale, OpenTelemetry.
#[derive(Parser)]
struct Args {
    /// Rounds; each runs every variant once.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Measured seconds per variant per round (after a 0.5 s warm-up).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Keep-alive connections of the load generator.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    connections: u32,
    /// Send plain requests (an entry service's outside traffic) instead of requests from an instrumented caller.
    #[arg(long)]
    external: bool,
    /// Run one variant only, for profiling it alone.
    #[arg(long, value_enum)]
    only: Option<Variant>,
    /// Only serve this variant (on 127.0.0.1, a free port) until killed, for an outside load generator.
    #[arg(long, value_enum)]
    serve: Option<Variant>,
    /// The share of requests rootscale measures (`1/16`), as `ROOTSCALE_SAMPLE` sets it for an agent.
    #[arg(long, default_value = "1")]
    sample: SampleRate,
}

fn main() {
    rootscale_examples::init_logging("warn");
    let args = Args::parse();
    if let Some(variant) = args.serve {
        let server = start_server(variant, args.sample);
        println!("listening on {}", server.addr);
        // Serves until the process is killed: nothing stops the server thread.
        let _ = server.thread.join();
        return;
    }
    let (rounds, connections) = (args.rounds, args.connections as usize);
    let seconds = Duration::from_secs(args.seconds);
    let warm_up = Duration::from_millis(500);
    let traffic = if args.external { "external requests" } else { "requests from an instrumented caller" };
    println!(
        "axum hello-world, 1 server thread, {connections} keep-alive connections, {rounds} rounds of {seconds:?}, {traffic}"
    );
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); Variant::ALL.len()];
    for round in 1..=rounds {
        for (index, variant) in Variant::ALL.into_iter().enumerate() {
            if args.only.is_some_and(|only| only != variant) {
                continue;
            }
            let server = start_server(variant, args.sample);
            let rps = drive(server.addr, connections, warm_up, seconds, !args.external);
            server.stop.store(true, Ordering::Relaxed);
            server.thread.join().expect("server thread");
            println!(
                "round {round} {:<14} {rps:>10.0} req/s  (instrumentation recorded {} requests)",
                variant.name(),
                server.instrumented.load(Ordering::Relaxed)
            );
            results[index].push(rps);
        }
    }
    if args.only.is_some() {
        return;
    }
    let medians: Vec<f64> = results.iter_mut().map(|r| median(r)).collect();
    println!();
    println!("{:<14} {:>12} {:>10}", "variant", "median req/s", "vs bare");
    for (variant, median) in Variant::ALL.iter().zip(&medians) {
        println!("{:<14} {:>12.0} {:>9.3}x", variant.name(), median, median / medians[0]);
    }
    println!("rootscale / opentelemetry: {:.3}x", medians[1] / medians[2]);
}
