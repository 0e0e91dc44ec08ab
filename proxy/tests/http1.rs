//! The sidecar over HTTP/1.1, with real servers on loopback: a linked service `svc-a` calls `svc-b`, a plain axum
//! application that knows nothing of rootscale, through `svc-b`'s proxy; `svc-b` calls the linked `svc-c` through
//! the proxy's HTTP proxy port, absolute-form, as an `HTTP_PROXY` client does. `svc-c` is slow (40 ms), `svc-b`
//! takes 5 ms of its own.
//!
//! Stated tolerances: medians of every request measured, within −1/+10 ms of what the handlers sleep.

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{ONE_AT_A_TIME, Records, agent, assert_near, listen, median};

use axum::{Router, extract::Request as AxumRequest, routing::get};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use rootscale_proto::v1::Verdict;
use rootscale_proxy::{Proxy, Routes};
use rootscale_tracer::{
    Agent, AgentView,
    identity::{KeyRing, MeshKeys},
};
use tokio::net::TcpStream;
use tower::{Layer, ServiceExt};

const C_SLEEP: Duration = Duration::from_millis(40);
const B_SLEEP: Duration = Duration::from_millis(5);

/// The application behind the proxy: sleeps, then calls `svc-c` through the proxy's outbound port, passing the
/// trace context on when `propagate`. Keeps the headers of every request it saw.
fn application(outbound: SocketAddr, propagate: bool, seen: Arc<Mutex<Vec<HeaderMap>>>) -> Router {
    Router::new().route(
        "/",
        get(move |request: AxumRequest| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(request.headers().clone());
                tokio::time::sleep(B_SLEEP).await;
                let stream = TcpStream::connect(outbound).await.map_err(|e| e.to_string())?;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                let mut call = Request::get("http://svc-c/work").header("host", "svc-c");
                if propagate {
                    for name in ["traceparent", "tracestate"] {
                        if let Some(value) = request.headers().get(name) {
                            call = call.header(name, value);
                        }
                    }
                }
                let response =
                    sender.send_request(call.body(Empty::<Bytes>::new()).unwrap()).await.map_err(|e| e.to_string())?;
                let status = response.status();
                response.into_body().collect().await.map_err(|e| e.to_string())?;
                if status == StatusCode::OK { Ok::<_, String>("b") } else { Err(format!("svc-c answered {status}")) }
            }
        }),
    )
}

/// svc-a → (svc-b's proxy → application) → svc-c, running.
struct Chain {
    a: Agent,
    b: Agent,
    c: Agent,
    a_addr: SocketAddr,
    proxy: Proxy,
    b_records: Arc<Records>,
    seen_by_app: Arc<Mutex<Vec<HeaderMap>>>,
}

async fn chain(propagate: bool) -> Chain {
    let keys = Arc::new(KeyRing::fixed(MeshKeys::generate().unwrap()));
    // svc-c: linked, slow.
    let c = agent("svc-c", &keys, false, None).await;
    let (listener, c_addr) = listen().await;
    let app = Router::new().route(
        "/work",
        get(|| async {
            tokio::time::sleep(C_SLEEP).await;
            "c"
        }),
    );
    tokio::spawn(axum::serve(listener, app.layer(c.server_layer())).into_future());
    // svc-b: the application and its proxy.
    let b_records = Arc::new(Records::default());
    let b = agent("svc-b", &keys, false, Some(b_records.clone())).await;
    let (app_listener, app_addr) = listen().await;
    let routes = Routes::default().with("svc-c", c_addr.to_string().parse().unwrap()).unwrap();
    let proxy = common::proxy(&b, app_addr, routes, &[]).await;
    let seen_by_app = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(
        axum::serve(app_listener, application(proxy.outbound_addr(), propagate, seen_by_app.clone())).into_future(),
    );
    // svc-a: linked, the entry, calling svc-b's proxy.
    let a = agent("svc-a", &keys, true, None).await;
    let to_b = a
        .client_layer()
        .callee("svc-b")
        .unwrap()
        .layer(Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>());
    let b_uri = format!("http://{}/", proxy.inbound_addr());
    let (listener, a_addr) = listen().await;
    let app = Router::new().route(
        "/",
        get(move || {
            let (to_b, b_uri) = (to_b.clone(), b_uri.clone());
            async move {
                let response =
                    to_b.oneshot(Request::get(b_uri).body(Empty::new()).unwrap()).await.map_err(|e| e.to_string())?;
                let status = response.status();
                response.into_body().collect().await.map_err(|e| e.to_string())?;
                if status == StatusCode::OK { Ok::<_, String>("a") } else { Err(format!("svc-b answered {status}")) }
            }
        }),
    );
    tokio::spawn(axum::serve(listener, app.layer(a.server_layer())).into_future());
    Chain { a, b, c, a_addr, proxy, b_records, seen_by_app }
}

/// Open-loop load at the entry: `rate` requests per second for `seconds`; how many succeeded.
async fn load(entry: SocketAddr, rate: u64, seconds: u64) -> (u64, u64) {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut sent = Vec::new();
    for _ in 0..rate * seconds {
        ticks.tick().await;
        let client = client.clone();
        sent.push(tokio::spawn(async move {
            let response = client.get(format!("http://{entry}/").parse().unwrap()).await.ok()?;
            let ok = response.status() == StatusCode::OK;
            response.into_body().collect().await.ok()?;
            ok.then_some(())
        }));
    }
    let total = sent.len() as u64;
    let mut ok = 0;
    for request in sent {
        if request.await.unwrap().is_some() {
            ok += 1;
        }
    }
    (total, ok)
}

fn verdict(view: &AgentView) -> (Verdict, Vec<String>, String) {
    let decision = view.snapshot().decision.unwrap_or_default();
    (decision.verdict(), decision.delegated_to.clone(), decision.evidence.map(|e| e.reason).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_service_is_measured_as_a_linked_one_and_the_delegation_passes_through_it() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let chain = chain(true).await;
    let (sent, ok) = load(chain.a_addr, 40, 4).await;
    assert_eq!(ok, sent, "every request succeeds through the proxy");
    // svc-b's requests, measured by its proxy: its calls to svc-c counted toward them.
    let requests = chain.b_records.requests.lock().unwrap().clone();
    assert!(requests.len() as u64 >= sent - 2, "{} of {sent} measured", requests.len());
    assert_near("svc-b downstream", median(requests.iter().map(|r| r.downstream).collect()), C_SLEEP);
    assert_near("svc-b local wait", median(requests.iter().map(|r| r.local_wait).collect()), B_SLEEP);
    let calls = chain.b_records.calls.lock().unwrap().clone();
    assert!(calls.iter().all(|call| &*call.callee == "svc-c" && call.remote_total.is_some()), "{:?}", calls.first());
    assert_near("svc-c remote total", median(calls.iter().filter_map(|c| c.remote_total).collect()), C_SLEEP);
    let counters = chain.proxy.counters();
    let correlated = counters.correlated.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(correlated, calls.len() as u64, "every call tied to its request");
    assert_eq!(counters.uncorrelated.load(std::sync::atomic::Ordering::Relaxed), 0);
    // The application sees the trace context, and none of rootscale's own headers.
    for headers in chain.seen_by_app.lock().unwrap().iter() {
        assert!(headers.contains_key("traceparent"), "{headers:?}");
        assert!(!headers.contains_key("rootscale-caller"), "{headers:?}");
    }
    // The verdicts, as with three linked services: the entry and svc-b delegate toward svc-c, the root cause.
    let (a, b, c) = (verdict(&chain.a.view()), verdict(&chain.b.view()), verdict(&chain.c.view()));
    assert_eq!((a.0, a.1.as_slice()), (Verdict::Delegated, ["svc-b".to_string()].as_slice()), "svc-a: {}", a.2);
    assert_eq!((b.0, b.1.as_slice()), (Verdict::Delegated, ["svc-c".to_string()].as_slice()), "svc-b: {}", b.2);
    assert_eq!(c.0, Verdict::RootCause, "svc-c: {}", c.2);
    assert_eq!(chain.proxy.correlator_open(), 0, "every request's registration ended with its response");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_trace_context_calls_are_forwarded_and_counted_not_attributed() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let chain = chain(false).await;
    let (sent, ok) = load(chain.a_addr, 40, 2).await;
    assert_eq!(ok, sent, "traffic is never broken");
    let requests = chain.b_records.requests.lock().unwrap().clone();
    // The calls are not tied to a request: its whole total counts as its own wait.
    assert!(requests.iter().all(|r| r.downstream.is_zero()), "{:?}", requests.first());
    assert_near("svc-b local wait", median(requests.iter().map(|r| r.local_wait).collect()), C_SLEEP + B_SLEEP);
    let counters = chain.proxy.counters();
    let uncorrelated = counters.uncorrelated.load(std::sync::atomic::Ordering::Relaxed);
    assert!(uncorrelated + 2 >= sent && uncorrelated <= sent, "{uncorrelated} uncorrelated of {sent}");
    assert_eq!(counters.correlated.load(std::sync::atomic::Ordering::Relaxed), 0);
    // The calls are still measured as calls of the window.
    assert!(!chain.b_records.calls.lock().unwrap().is_empty());
}
