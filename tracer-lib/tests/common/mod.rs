//! Real services on loopback for the tracer's tests: axum (HTTP) and tonic (gRPC) servers wrapped in rootscale's
//! server layer, whose handlers spin, sleep and call other services through the client layer; a TCP proxy that
//! delays responses; and an observer that keeps every record.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rootscale_proto::v1::{
    NeighborAck, NeighborReport,
    neighbor_client::NeighborClient,
    neighbor_server::{Neighbor, NeighborServer},
};
use rootscale_tracer::{CallRecord, Observer, RequestRecord, TraceClient, Tracer};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tower::{ServiceBuilder, ServiceExt};

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Keeps every request and call record of one service.
#[derive(Default)]
pub struct Records {
    pub requests: Mutex<Vec<RequestRecord>>,
    pub calls: Mutex<Vec<CallRecord>>,
}

impl Observer for Records {
    fn on_request(&self, record: &RequestRecord) {
        self.requests.lock().unwrap().push(record.clone());
    }
    fn on_call(&self, record: &CallRecord) {
        self.calls.lock().unwrap().push(record.clone());
    }
}

impl Records {
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.requests.lock().unwrap().clone()
    }
    pub fn calls(&self) -> Vec<CallRecord> {
        self.calls.lock().unwrap().clone()
    }
    pub fn clear(&self) {
        self.requests.lock().unwrap().clear();
        self.calls.lock().unwrap().clear();
    }
}

/// A tracer for `service` that keeps its records.
pub fn traced(service: &str) -> (Tracer, Arc<Records>) {
    let records = Arc::new(Records::default());
    // Tests read entry services' timing headers from outside, as a curl user debugging would.
    let tracer = Tracer::builder(service)
        .agent_addr(format!("127.0.0.1:{}", 9000 + service.len()))
        .timing_for_everyone(true)
        .observer(records.clone())
        .build()
        .unwrap();
    (tracer, records)
}

/// Something a handler calls.
#[derive(Clone)]
pub enum Callee {
    Http { client: TraceClient<HttpClient>, uri: String },
    Grpc(NeighborClient<TraceClient<tonic::transport::Channel>>),
}

impl Callee {
    /// An HTTP callee at `addr`, called through `tracer`'s client layer.
    pub fn http(tracer: &Tracer, addr: SocketAddr) -> Self {
        let client = ServiceBuilder::new().layer(tracer.client_layer()).service(plain_client());
        Callee::Http { client, uri: format!("http://{addr}/") }
    }

    /// A gRPC callee at `addr`, called through `tracer`'s client layer on a tonic channel.
    pub fn grpc(tracer: &Tracer, addr: SocketAddr) -> Self {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        Callee::Grpc(NeighborClient::new(ServiceBuilder::new().layer(tracer.client_layer()).service(channel)))
    }

    pub async fn call(&self) {
        match self {
            Callee::Http { client, uri } => {
                let request = Request::get(uri.as_str()).body(Empty::new()).unwrap();
                let response = client.clone().oneshot(request).await.expect("http call");
                response.into_body().collect().await.expect("http body");
            }
            Callee::Grpc(client) => {
                client.clone().exchange(NeighborReport::default()).await.expect("grpc call");
            }
        }
    }
}

/// What a handler does: spin on the CPU, sleep, then make each group of calls (calls in a group in parallel).
#[derive(Clone, Default)]
pub struct Behavior {
    pub spin: Duration,
    pub sleep: Duration,
    pub groups: Vec<Vec<Callee>>,
}

impl Behavior {
    pub fn sleep(ms: u64) -> Self {
        Behavior { sleep: Duration::from_millis(ms), ..Default::default() }
    }

    pub fn then(mut self, group: Vec<Callee>) -> Self {
        self.groups.push(group);
        self
    }

    pub async fn run(&self) {
        if !self.spin.is_zero() {
            spin(self.spin);
        }
        if !self.sleep.is_zero() {
            tokio::time::sleep(self.sleep).await;
        }
        for group in &self.groups {
            join_all(group.iter().map(Callee::call)).await;
        }
    }
}

/// Burns CPU for `duration` of wall time without yielding.
pub fn spin(duration: Duration) {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed() < duration {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

/// An axum server behind `tracer`'s server layer, answering `/` with `behavior`.
pub async fn serve_http(tracer: &Tracer, behavior: Behavior) -> SocketAddr {
    let behavior = Arc::new(behavior);
    let app = Router::new()
        .route(
            "/",
            get(move || {
                let behavior = behavior.clone();
                async move {
                    behavior.run().await;
                    "ok"
                }
            }),
        )
        .layer(tracer.server_layer());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

struct GrpcHandler(Arc<Behavior>);

#[tonic::async_trait]
impl Neighbor for GrpcHandler {
    async fn exchange(
        &self,
        _request: tonic::Request<NeighborReport>,
    ) -> Result<tonic::Response<NeighborAck>, tonic::Status> {
        self.0.run().await;
        Ok(tonic::Response::new(NeighborAck::default()))
    }
}

/// A tonic server behind `tracer`'s server layer, answering `Neighbor.Exchange` with `behavior`.
pub async fn serve_grpc(tracer: &Tracer, behavior: Behavior) -> SocketAddr {
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let router = tonic::transport::Server::builder()
        .layer(tracer.server_layer())
        .add_service(NeighborServer::new(GrpcHandler(Arc::new(behavior))));
    tokio::spawn(async move { router.serve_with_incoming(incoming).await.unwrap() });
    addr
}

/// An HTTP client with no rootscale layer: the outside world.
pub fn plain_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `http://addr/` from outside, returning the response head and body.
pub async fn get_from_outside(client: &HttpClient, addr: SocketAddr) -> Response<Bytes> {
    let response = client.get(format!("http://{addr}/").parse().unwrap()).await.expect("request");
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, body.collect().await.expect("body").to_bytes())
}

/// A TCP proxy to `upstream` that holds every byte of the response direction for `delay` (a delay line: chunks
/// keep their spacing, so the whole response arrives `delay` late, however it is split).
pub async fn delaying_proxy(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
                let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                tokio::spawn(async move {
                    while let Some((due, chunk)) = receiver.recv().await {
                        tokio::time::sleep_until(due.into()).await;
                        if client_write.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                });
                let mut buffer = vec![0u8; 64 * 1024];
                loop {
                    match server_read.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if sender.send((Instant::now() + delay, buffer[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Tests that time waits of a few milliseconds take this first, so that within their binary they run one at a time
/// and none measures another's load (CPU spins, hogs).
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Requests a timing test sends and takes the median of: a stall of this shared machine (a late timer, a thread
/// preempted) lands on one or two of them and moves no median, while a wait counted twice or in the wrong place is
/// in every one of them.
pub const ROUNDS: usize = 5;

/// What [`drive`] got back: each response, and how long its round trip took as the client saw it (the ground truth
/// a server's own `total` of the same request cannot exceed).
pub struct Driven {
    pub responses: Vec<Response<Bytes>>,
    pub round_trips: Vec<Duration>,
}

/// Sends `ROUNDS` requests from outside to `addr` after one warm-up (connection set-up), then clears the records.
pub async fn drive(addr: SocketAddr, records: &[&Records]) -> Driven {
    let client = plain_client();
    get_from_outside(&client, addr).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for r in records {
        r.clear();
    }
    let mut driven = Driven { responses: Vec::new(), round_trips: Vec::new() };
    for _ in 0..ROUNDS {
        let sent = Instant::now();
        driven.responses.push(get_from_outside(&client, addr).await);
        driven.round_trips.push(sent.elapsed());
    }
    // Server-side records are made when the response body ends, just after the client has it.
    tokio::time::sleep(Duration::from_millis(20)).await;
    driven
}

/// Milliseconds a measured value may read below what a handler slept (timers never fire early; the clock's rounding
/// to microseconds) and above it (timer granularity, a debug build's own time). Below the smallest wait the tests
/// time (10 ms), so a wait counted twice or in the wrong place fails.
pub const SLACK_BELOW_MS: f64 = 0.5;
pub const SLACK_ABOVE_MS: f64 = 5.0;

/// Asserts a median `value` is within [`SLACK_BELOW_MS`] below and [`SLACK_ABOVE_MS`] above `expected_ms`.
pub fn assert_near(what: &str, value: Duration, expected_ms: f64) {
    let value_ms = ms(value);
    assert!(
        value_ms >= expected_ms - SLACK_BELOW_MS && value_ms <= expected_ms + SLACK_ABOVE_MS,
        "{what} = {value_ms:.2} ms, expected {expected_ms} ms (-{SLACK_BELOW_MS}/+{SLACK_ABOVE_MS})"
    );
}

/// Closes every window from `first` to the current one and returns them.
pub fn close_all(tracer: &Tracer, first: u64) -> Vec<Arc<rootscale_tracer::ClosedWindow>> {
    let last = tracer.window_clock().window_id(Instant::now());
    (first..=last).filter_map(|id| tracer.close_window(id)).collect()
}

/// How long after a window ends [`WindowCollector`] closes it: its last requests' records are in by then.
const COLLECTOR_GRACE: Duration = Duration::from_millis(300);

/// Closes a tracer's windows as they end, as the agent's window closer does, and keeps them. A test that closes its
/// windows only at the end ([`close_all`]) loses a run that outlasts the few windows a shard keeps open — the
/// oldest is dropped, its records counted as lost — which a loaded machine makes of a run of a few seconds.
pub struct WindowCollector {
    tracer: Tracer,
    /// The next window to close, and the windows closed so far.
    state: Arc<Mutex<(u64, Vec<Arc<rootscale_tracer::ClosedWindow>>)>>,
    task: tokio::task::JoinHandle<()>,
}

impl WindowCollector {
    /// Starts closing `tracer`'s windows from `first` on, each once it has ended.
    pub fn start(tracer: &Tracer, first: u64) -> Self {
        let state = Arc::new(Mutex::new((first, Vec::new())));
        let task = tokio::spawn({
            let (tracer, state) = (tracer.clone(), state.clone());
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let now = Instant::now();
                    let ended = tracer.window_clock().window_id(now.checked_sub(COLLECTOR_GRACE).unwrap_or(now));
                    Self::close_before(&tracer, &state, ended);
                }
            }
        });
        Self { tracer: tracer.clone(), state, task }
    }

    fn close_before(tracer: &Tracer, state: &Mutex<(u64, Vec<Arc<rootscale_tracer::ClosedWindow>>)>, end: u64) {
        let mut state = state.lock().unwrap();
        while state.0 < end {
            let id = state.0;
            if let Some(window) = tracer.close_window(id) {
                state.1.push(window);
            }
            state.0 += 1;
        }
    }

    /// Stops, closes every window up to the current one, and returns every window closed.
    pub fn finish(self) -> Vec<Arc<rootscale_tracer::ClosedWindow>> {
        self.task.abort();
        let current = self.tracer.window_clock().window_id(Instant::now());
        Self::close_before(&self.tracer, &self.state, current + 1);
        std::mem::take(&mut self.state.lock().unwrap().1)
    }
}

/// A request's local wait other than its wait for a CPU: a handler's own sleep, or a call counted in the wrong place.
/// The run queue of a loaded machine lands in `cpu_wait`, measured apart, which this takes out.
pub fn off_cpu(request: &RequestRecord) -> Duration {
    request.local_wait.saturating_sub(request.cpu_wait)
}

/// The median of `values`.
pub fn median(mut values: Vec<Duration>) -> Duration {
    assert!(!values.is_empty(), "no values");
    values.sort();
    values[values.len() / 2]
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
