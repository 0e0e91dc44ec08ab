//! The sidecar never breaks the application's traffic: streaming responses pass through as they are made, a
//! request its caller abandons is recorded as cancelled and frees its place, an application or callee that cannot
//! be reached is a 502 the proxy counts, malformed rootscale headers are ignored, and a call that would loop back
//! into the proxy is refused; a connection that does not speak HTTP (or waits for the server to speak first) is
//! passed to the application byte for byte; every one of these is counted on the agent's `/metrics`; and the
//! sidecar whose agent cannot start (its port taken) still forwards. All on loopback.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use axum::{Router, body::Body, routing::get};
use bytes::Bytes;
use common::{ONE_AT_A_TIME, Records, agent, listen};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rootscale_proxy::{Proxy, Routes};
use rootscale_tracer::identity::{KeyRing, MeshKeys};

const CHUNK_GAP: Duration = Duration::from_millis(15);

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An application with a streaming route, a slow route and a fast one; its proxy; the proxy's records.
async fn proxied() -> (Proxy, Arc<Records>, rootscale_tracer::Agent) {
    let keys = Arc::new(KeyRing::fixed(MeshKeys::generate().unwrap()));
    let records = Arc::new(Records::default());
    let agent = agent("svc-b", &keys, false, Some(records.clone())).await;
    let (listener, app) = listen().await;
    let router = Router::new()
        .route(
            "/stream",
            get(|| async {
                let chunks = futures_util::stream::unfold(0, |sent| async move {
                    if sent == 3 {
                        return None;
                    }
                    if sent > 0 {
                        tokio::time::sleep(CHUNK_GAP).await;
                    }
                    Some((Ok::<_, Infallible>(Bytes::from(format!("chunk {sent}\n"))), sent + 1))
                });
                Body::from_stream(chunks)
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "slow"
            }),
        )
        .route(
            "/fast",
            get(|headers: http::HeaderMap| async move { format!("{}", headers.contains_key("rootscale-caller")) }),
        );
    tokio::spawn(axum::serve(listener, router).into_future());
    let proxy = common::proxy(&agent, app, Routes::default(), &[]).await;
    (proxy, records, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_response_passes_through_as_it_is_made_and_its_total_ends_with_it() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (proxy, records, _agent) = proxied().await;
    let started = Instant::now();
    let response = client().get(format!("http://{}/stream", proxy.inbound_addr()).parse().unwrap()).await.unwrap();
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if frame.unwrap().is_data() {
            arrivals.push(started.elapsed());
        }
    }
    assert_eq!(arrivals.len(), 3, "three chunks, each as it was sent: {arrivals:?}");
    // Buffered, all three would arrive together; streamed, the first comes two gaps before the last.
    assert!(arrivals[2] - arrivals[0] >= CHUNK_GAP, "not buffered: {arrivals:?}");
    let total = records.requests.lock().unwrap()[0].total;
    assert!(
        total >= 2 * CHUNK_GAP && total <= 2 * CHUNK_GAP + Duration::from_millis(15),
        "the request's total ends with its last chunk: {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_request_is_cancelled_frees_its_place_and_the_next_goes_through() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (proxy, records, _agent) = proxied().await;
    let slow = format!("http://{}/slow", proxy.inbound_addr());
    let abandoned = tokio::time::timeout(Duration::from_millis(50), client().get(slow.parse().unwrap())).await;
    assert!(abandoned.is_err(), "the caller gave up first");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recorded = records.requests.lock().unwrap().clone();
    assert_eq!(recorded.len(), 1);
    assert!(recorded[0].cancelled, "{:?}", recorded[0]);
    assert_eq!(proxy.correlator_open(), 0, "its registration ended with it");
    let next = client().get(format!("http://{}/fast", proxy.inbound_addr()).parse().unwrap()).await.unwrap();
    assert_eq!(next.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rootscale_headers_are_ignored_and_never_reach_the_application() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (proxy, _records, _agent) = proxied().await;
    let request = Request::get(format!("http://{}/fast", proxy.inbound_addr()))
        .header("rootscale-caller", "not a caller;;;=====")
        .header("traceparent", "99-garbage")
        .body(Empty::new())
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let saw_caller = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&saw_caller[..], b"false", "the application did not see rootscale-caller");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_or_callee_that_cannot_be_reached_is_a_counted_502() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let keys = Arc::new(KeyRing::fixed(MeshKeys::generate().unwrap()));
    let agent = agent("svc-b", &keys, false, None).await;
    // Nothing listens where the application should be, nor where the route to svc-c points.
    let (listener, nowhere) = listen().await;
    drop(listener);
    let routes = Routes::default().with("svc-c", nowhere.to_string().parse().unwrap()).unwrap();
    let proxy = common::proxy(&agent, nowhere, routes, &[]).await;
    let inbound = client().get(format!("http://{}/", proxy.inbound_addr()).parse().unwrap()).await.unwrap();
    assert_eq!(inbound.status(), StatusCode::BAD_GATEWAY);
    let outbound = proxy_get(proxy.outbound_addr(), "http://svc-c/").await;
    assert_eq!(outbound, StatusCode::BAD_GATEWAY);
    assert_eq!(proxy.counters().upstream_errors.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_would_loop_into_the_proxy_is_refused() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (proxy, _records, _agent) = proxied().await;
    let status = proxy_get(proxy.outbound_addr(), &format!("http://{}/fast", proxy.inbound_addr())).await;
    assert_eq!(status, StatusCode::LOOP_DETECTED);
    let status = proxy_get(proxy.outbound_addr(), &format!("http://{}/", proxy.outbound_addr())).await;
    assert_eq!(status, StatusCode::LOOP_DETECTED);
    assert_eq!(proxy.counters().refused.load(Ordering::Relaxed), 2);
}

/// A GET through an HTTP proxy port, absolute-form, as an `HTTP_PROXY` client sends it.
async fn proxy_get(proxy: SocketAddr, target: &str) -> StatusCode {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(Request::get(target).body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    response.status()
}

/// An application that speaks a protocol of its own: it greets first, then echoes.
async fn greeting_echo() -> SocketAddr {
    let (listener, addr) = listen().await;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                stream.write_all(b"hello\n").await?;
                let mut buf = [0u8; 256];
                loop {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    stream.write_all(&buf[..n]).await?;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_other_than_http_passes_through_untouched_and_is_counted_on_the_agent_s_metrics() {
    let _serial = ONE_AT_A_TIME.lock().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let keys = Arc::new(KeyRing::fixed(MeshKeys::generate().unwrap()));
    let counters = Arc::new(rootscale_proxy::ProxyCounters::default());
    let agent = rootscale_tracer::Agent::builder("svc-b")
        .listen("127.0.0.1:0".parse().unwrap())
        .mesh_keys(keys)
        .extra_metrics(counters.clone())
        .start()
        .await
        .unwrap();
    let app = greeting_echo().await;
    let mut config = rootscale_proxy::ProxyConfig::new(app);
    config.inbound = "127.0.0.1:0".parse().unwrap();
    config.outbound = "127.0.0.1:0".parse().unwrap();
    let proxy = Proxy::start_counting(&config, agent.tracer(), counters.clone()).await.unwrap();

    // A client that speaks first, in bytes no HTTP request starts with (a TLS ClientHello's).
    let mut stream = tokio::net::TcpStream::connect(proxy.inbound_addr()).await.unwrap();
    stream.write_all(b"\x16\x03\x01 not http").await.unwrap();
    let mut got = vec![0u8; b"hello\n\x16\x03\x01 not http".len()];
    stream.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..], b"hello\n\x16\x03\x01 not http");
    // A client that waits for the server's greeting: passed through once the connection has stayed silent.
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(proxy.inbound_addr()).await.unwrap();
    let mut greeting = [0u8; 6];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"hello\n");
    let waited = started.elapsed();
    assert!(
        waited >= rootscale_proxy::FIRST_BYTES_WITHIN,
        "greeted after {waited:?}, before the proxy gave up on HTTP"
    );
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
    assert_eq!(counters.passthrough.load(Ordering::Relaxed), 2);
    // Nothing was measured as a request.
    assert_eq!(agent.view().snapshot().last_window.map_or(0, |w| w.requests), 0);

    // An unreachable callee, counted; then the agent's /metrics says both.
    let status = proxy_get(proxy.outbound_addr(), "http://127.0.0.1:1/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let metrics = client().get(format!("http://{}/metrics", agent.local_addr()).parse().unwrap()).await.unwrap();
    let text = String::from_utf8(metrics.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    for line in [
        "rootscale_proxy_passthrough_connections_total 2",
        "rootscale_proxy_upstream_errors_total 1",
        "rootscale_proxy_outbound_calls_total{correlation=\"uncorrelated\"} 1",
        "rootscale_proxy_outbound_calls_total{correlation=\"correlated\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} not in the agent's /metrics:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_start_leaves_the_traffic_flowing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // The agent's port is taken, so the sidecar's agent cannot bind; the proxy must still forward.
    let (taken, agent_addr) = listen().await;
    let (app_listener, app) = listen().await;
    tokio::spawn(axum::serve(app_listener, Router::new().route("/", get(|| async { "app" }))).into_future());
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (inbound, outbound) = (free(), free());
    let mut sidecar = std::process::Command::new(env!("CARGO_BIN_EXE_rootscale-proxy"))
        .arg("run")
        .env("ROOTSCALE_SERVICE", "svc-b")
        .env("ROOTSCALE_AGENT_LISTEN", agent_addr.to_string())
        .env("ROOTSCALE_PROXY_APP", app.to_string())
        .env("ROOTSCALE_PROXY_INBOUND", inbound.to_string())
        .env("ROOTSCALE_PROXY_OUTBOUND", outbound.to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut answered = None;
    for _ in 0..100 {
        if let Ok(response) = client().get(format!("http://{inbound}/").parse().unwrap()).await {
            answered = Some(response.into_body().collect().await.unwrap().to_bytes());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = sidecar.kill();
    let output = sidecar.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert_eq!(answered.as_deref(), Some(&b"app"[..]), "no answer through the sidecar; its log:\n{log}");
    assert!(log.contains("the agent could not start"), "the sidecar did not say why it is unmeasured:\n{log}");
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_connection_opened_ahead_of_its_request_is_still_served_as_http() {
    let _serial = ONE_AT_A_TIME.lock().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (proxy, records, _agent) = proxied().await;
    // A connection pool's spare connection: open, silent past the proxy's wait for first bytes, then used.
    let mut stream = tokio::net::TcpStream::connect(proxy.inbound_addr()).await.unwrap();
    tokio::time::sleep(rootscale_proxy::FIRST_BYTES_WITHIN + Duration::from_millis(300)).await;
    stream.write_all(b"GET /fast HTTP/1.1\r\nHost: svc-b\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with("false"), "the application's answer: {response}");
    assert_eq!(proxy.counters().passthrough.load(Ordering::Relaxed), 0, "served as HTTP, not passed through");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(records.requests.lock().unwrap().len(), 1, "measured as a request");
}
