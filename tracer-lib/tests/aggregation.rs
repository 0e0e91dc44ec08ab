//! Window aggregation under real traffic: the edge cap against spoofed callers, malformed timing headers, window
//! roll-over with exact counts, and the Prometheus exposition.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{Router, extract::Query, routing::get};
use common::*;
use futures_util::StreamExt;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use rootscale_tracer::{CALLER_HEADER, TIMING_HEADER, Tracer};
use tower::{ServiceBuilder, ServiceExt};

async fn send_with_caller(client: &HttpClient, addr: std::net::SocketAddr, caller: Option<&[u8]>) {
    let mut request = Request::get(format!("http://{addr}/")).body(Empty::new()).unwrap();
    if let Some(caller) = caller {
        request.headers_mut().insert(CALLER_HEADER, HeaderValue::from_bytes(caller).unwrap());
    }
    let response = client.request(request).await.expect("request");
    response.into_body().collect().await.expect("body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_callers_stay_under_the_edge_cap_and_malformed_headers_are_counted() {
    const CAP: usize = 32;
    const SPOOFED: usize = 10_000;
    const MALFORMED_CALLERS: usize = 500;
    const MALFORMED_TIMINGS: usize = 1_000;
    let tracer = Tracer::builder("svc-a").edge_cap(CAP).window(Duration::from_secs(3600)).build().unwrap();
    let first_window = tracer.window_clock().window_id(std::time::Instant::now());
    let addr = serve_http(&tracer, Behavior::default()).await;
    let client = plain_client();

    // 10,000 requests, each claiming to come from a different service.
    futures_util::stream::iter(0..SPOOFED)
        .map(|i| {
            let client = client.clone();
            async move {
                send_with_caller(
                    &client,
                    addr,
                    Some(format!("s=spoof-{i};a=10.1.{}.{}:9797", i / 256, i % 256).as_bytes()),
                )
                .await
            }
        })
        .buffer_unordered(32)
        .collect::<()>()
        .await;
    // Malformed caller headers: counted, and the requests still served as external ones.
    let bad_callers: [&[u8]; 5] = [b"s=", b"s=a;a=nope", b"x=1", b"s=\xff\xfe", b"s=a;a=h:1;junk"];
    for i in 0..MALFORMED_CALLERS {
        send_with_caller(&client, addr, Some(bad_callers[i % bad_callers.len()])).await;
    }

    // An un-instrumented upstream answering with malformed timing headers, called through the client layer.
    let bad_timings: Vec<Vec<u8>> = vec![
        b"v=1".to_vec(),
        b"v=9;s=x;t=1;w=1;k=l;at=x".to_vec(),
        b"v=1;s=x;t=-5;w=1;k=l;at=x".to_vec(),
        b"v=1;s=x;t=1;w=1;k=q;at=x".to_vec(),
        b"v=1;s=x;t=1;w=1;k=n;at=x".to_vec(),
        b"v=1;s=\xc3\x28;t=1;w=1;k=l;at=x".to_vec(),
        "v=1;s=x;t=1;w=1;k=l;at=x;a=".repeat(20).into_bytes(),
        b"v=1;s=x;t=99999999999999999999;w=1;k=l;at=x".to_vec(),
    ];
    let upstream_values = Arc::new(bad_timings);
    let upstream = Router::new().route(
        "/",
        get(move |Query(query): Query<HashMap<String, usize>>| {
            let values = upstream_values.clone();
            async move {
                let i = query.get("i").copied().unwrap_or(0);
                let value = HeaderValue::from_bytes(&values[i % values.len()]).unwrap();
                ([(TIMING_HEADER, value)], "upstream")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, upstream).await });
    let traced_client = ServiceBuilder::new().layer(tracer.client_layer()).service(plain_client());
    for i in 0..MALFORMED_TIMINGS {
        let request = Request::get(format!("http://{upstream_addr}/?i={i}")).body(Empty::new()).unwrap();
        let response = traced_client.clone().oneshot(request).await.expect("upstream call");
        response.into_body().collect().await.expect("upstream body");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;

    let windows = close_all(&tracer, first_window);
    let requests: u64 = windows.iter().map(|w| w.stats.requests).sum();
    assert_eq!(requests, (SPOOFED + MALFORMED_CALLERS) as u64);
    let mut identified = 0;
    for window in &windows {
        let stats = &window.stats;
        assert!(stats.inbound.len() <= CAP, "{} inbound edges over the cap", stats.inbound.len());
        if stats.requests as usize > CAP {
            assert_eq!(stats.inbound.len(), CAP);
        }
        identified += stats.inbound.values().map(|e| e.requests).sum::<u64>() + stats.inbound_overflow;
        assert_eq!(
            stats.requests,
            stats.external_requests + stats.inbound.values().map(|e| e.requests).sum::<u64>() + stats.inbound_overflow
        );
    }
    assert_eq!(identified, SPOOFED as u64);
    let counters = tracer.counters();
    assert_eq!(counters.malformed_caller.load(std::sync::atomic::Ordering::Relaxed), MALFORMED_CALLERS as u64);
    assert_eq!(counters.malformed_timing.load(std::sync::atomic::Ordering::Relaxed), MALFORMED_TIMINGS as u64);
    // The calls with unusable timing are kept, as untimed calls to the upstream's address.
    // An un-instrumented callee is named after its address, made into a valid service name.
    let upstream_name = format!("127.0.0.1-{}", upstream_addr.port());
    let untimed: u64 = windows
        .iter()
        .filter_map(|w| w.stats.outbound.get(upstream_name.as_str()))
        .map(|edge| {
            assert_eq!(edge.untimed, edge.calls);
            edge.calls
        })
        .sum();
    assert_eq!(untimed, MALFORMED_TIMINGS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_roll_over_and_their_counts_equal_the_requests_sent() {
    let (b_tracer, _) = traced("svc-b");
    let b_addr = serve_grpc(&b_tracer, Behavior::default()).await;
    let tracer = Tracer::builder("svc-a").window(Duration::from_millis(200)).build().unwrap();
    let mut subscription = tracer.subscribe();
    let (sender, mut closed) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while subscription.changed().await.is_ok() {
            if let Some(window) = subscription.borrow_and_update().clone() {
                let _ = sender.send(window);
            }
        }
    });
    let closer = tokio::spawn(tracer.run_window_closer());
    let addr = serve_http(&tracer, Behavior::default().then(vec![Callee::grpc(&tracer, b_addr)])).await;
    let client = plain_client();
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_millis(1100) {
        send_with_caller(&client, addr, Some(b"s=svc-x")).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // Collect windows until the one the last request ended in has closed.
    let last = tracer.window_clock().window_id(std::time::Instant::now());
    let mut windows = Vec::new();
    while windows.last().is_none_or(|w: &Arc<rootscale_tracer::ClosedWindow>| w.stats.window_id < last) {
        let window = tokio::time::timeout(Duration::from_secs(5), closed.recv()).await.unwrap().unwrap();
        windows.push(window);
    }
    closer.abort();
    check_no_losses(&tracer);
    let with_traffic = windows.iter().filter(|w| w.stats.requests > 0).count();
    assert!(with_traffic >= 4, "only {with_traffic} windows had traffic in 1.1 s of 200 ms windows");
    let ids: Vec<u64> = windows.iter().map(|w| w.stats.window_id).collect();
    assert!(ids.windows(2).all(|pair| pair[1] == pair[0] + 1), "window ids not consecutive: {ids:?}");
    assert_eq!(windows.iter().map(|w| w.stats.requests).sum::<u64>(), sent);
    let calls: u64 = windows.iter().filter_map(|w| w.stats.outbound.get("svc-b")).map(|e| e.calls).sum();
    assert_eq!(calls, sent);
    let from_x: u64 = windows.iter().filter_map(|w| w.stats.inbound.get("svc-x")).map(|e| e.requests).sum();
    assert_eq!(from_x, sent);
}

fn check_no_losses(tracer: &Tracer) {
    let losses = tracer.losses();
    assert_eq!(losses.late.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(losses.unclosed.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_the_last_closed_window() {
    let (b, _) = traced("svc-b");
    let (a, _) = traced("svc-a");
    let b_addr = serve_grpc(&b, Behavior::sleep(10)).await;
    let first = a.window_clock().window_id(std::time::Instant::now());
    let a_addr = serve_http(&a, Behavior::default().then(vec![Callee::grpc(&a, b_addr)])).await;
    let client = plain_client();
    for _ in 0..20 {
        get_from_outside(&client, a_addr).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let last = a.window_clock().window_id(std::time::Instant::now());
    for id in first..=last {
        a.close_window(id);
    }
    let text = rootscale_tracer::metrics::encode_text(&a).unwrap();
    for expected in [
        "# TYPE rootscale_window_requests gauge",
        "rootscale_window_latency_seconds{service=\"svc-a\",measure=\"total\",quantile=\"0.95\"}",
        "rootscale_edge_latency_seconds{service=\"svc-a\",callee=\"svc-b\",measure=\"remote_wait\",quantile=\"0.5\"}",
        "rootscale_malformed_headers_total{service=\"svc-a\",header=\"rootscale-caller\"} 0",
        "rootscale_edge_requests{service=\"svc-a\",direction=\"outbound\",peer=\"svc-b\"}",
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
    // Only the last closed window is exposed; it holds this test's requests unless they straddled a boundary.
    let window = a.last_window().unwrap();
    let line = format!("rootscale_window_requests{{service=\"svc-a\"}} {}", window.stats.requests);
    assert!(text.contains(&line), "missing {line} in\n{text}");
}

#[test]
fn each_window_closes_once_and_only_after_it_began() {
    let tracer = Tracer::builder("svc-a").build().unwrap();
    let now = tracer.window_clock().window_id(std::time::Instant::now());
    assert!(tracer.close_window(now + 1).is_none(), "a future window cannot be closed");
    assert!(tracer.close_window(now - 1).is_some());
    assert!(tracer.close_window(now - 1).is_none(), "closing twice publishes nothing new");
    assert!(tracer.close_window(now - 2).is_none(), "nor can an earlier window be closed after a later one");
    assert_eq!(tracer.last_window().unwrap().stats.window_id, now - 1);
}
