//! Where requests wait, measured on real axum and tonic servers on loopback (docs/DESIGN.md §1.1–1.2).
//!
//! Tolerances: sleeps are lower bounds (a timer never fires early), so measured values are checked against
//! `[expected - 0.5 ms, expected + 5 ms]`: the upper slack absorbs timer granularity (tokio's timer rounds up to the
//! millisecond) and a debug build's own time, yet every wait here is at least 5 ms, so a wait counted twice or in
//! the wrong place fails (a 5 ms callee measured through a 20 ms link, with the link counted in it, is 25 ms).
//! Measured here: 0.0–2.5 ms above what the handlers sleep. Medians over several requests, never single samples.

mod common;

use std::time::Duration;

use common::*;
use rootscale_tracer::{TIMING_HEADER, WaitPoint};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_handler_shows_local_wait() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (a, a_records) = traced("svc-a");
    let addr = serve_http(&a, Behavior::sleep(40)).await;
    drive(addr, &[&a_records]).await;
    let requests = a_records.requests();
    assert_eq!(requests.len(), ROUNDS);
    assert_near("local_wait off the CPU", median(requests.iter().map(off_cpu).collect()), 40.0);
    assert_near("total", median(requests.iter().map(|r| r.total).collect()), 40.0);
    assert!(median(requests.iter().map(|r| r.busy).collect()) < Duration::from_millis(2));
    assert!(requests.iter().all(|r| r.downstream.is_zero() && r.caller.is_none() && !r.error));
    assert_eq!(requests[0].largest_wait.point, WaitPoint::Local { service: "svc-a".into() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_callee_time_comes_back_as_remote_total_with_small_net_wait() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (b, b_records) = traced("svc-b");
    let (c, c_records) = traced("svc-c");
    let c_addr = serve_grpc(&c, Behavior::sleep(30)).await;
    let b_addr = serve_http(&b, Behavior::default().then(vec![Callee::grpc(&b, c_addr)])).await;
    drive(b_addr, &[&b_records, &c_records]).await;

    let calls = b_records.calls();
    assert_eq!(calls.len(), ROUNDS);
    assert!(calls.iter().all(|c| &*c.callee == "svc-c" && c.critical && !c.error && !c.malformed_timing));
    assert_near("remote_total", median(calls.iter().map(|c| c.remote_total.unwrap()).collect()), 30.0);
    let net_wait = median(calls.iter().map(|c| c.net_wait.unwrap()).collect());
    assert!(net_wait < Duration::from_millis(3), "net_wait on loopback = {net_wait:?}");
    // C saw B as its caller, and B's downstream time is the call.
    assert!(c_records.requests().iter().all(|r| r.caller.as_deref() == Some("svc-b")));
    let b_requests = b_records.requests();
    assert_near("B downstream", median(b_requests.iter().map(|r| r.downstream).collect()), 30.0);
    assert!(median(b_requests.iter().map(off_cpu).collect()) < Duration::from_millis(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delaying_proxy_between_b_and_c_shows_as_net_wait() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (b, b_records) = traced("svc-b");
    let (c, _) = traced("svc-c");
    let c_addr = serve_grpc(&c, Behavior::sleep(5)).await;
    let proxy = delaying_proxy(c_addr, Duration::from_millis(20)).await;
    let b_addr = serve_http(&b, Behavior::default().then(vec![Callee::grpc(&b, proxy)])).await;
    let responses = drive(b_addr, &[&b_records]).await.responses;

    let calls = b_records.calls();
    assert_eq!(calls.len(), ROUNDS);
    assert_near("net_wait", median(calls.iter().map(|c| c.net_wait.unwrap()).collect()), 20.0);
    assert_near("remote_total", median(calls.iter().map(|c| c.remote_total.unwrap()).collect()), 5.0);
    // B names the link as its largest wait.
    let header = responses[ROUNDS / 2].headers()[TIMING_HEADER].to_str().unwrap().to_string();
    assert!(header.contains(";k=n;at=svc-b>svc-c"), "B's timing header: {header}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_calls_count_once_and_only_the_last_to_finish_is_critical() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (a, a_records) = traced("svc-a");
    let (c1, _) = traced("svc-c1");
    let (c2, _) = traced("svc-c2");
    let c1_addr = serve_http(&c1, Behavior::sleep(30)).await;
    let c2_addr = serve_grpc(&c2, Behavior::sleep(50)).await;
    let a_addr =
        serve_http(&a, Behavior::default().then(vec![Callee::http(&a, c1_addr), Callee::grpc(&a, c2_addr)])).await;
    drive(a_addr, &[&a_records]).await;

    let requests = a_records.requests();
    assert_near("downstream", median(requests.iter().map(|r| r.downstream).collect()), 50.0);
    assert!(median(requests.iter().map(off_cpu).collect()) < Duration::from_millis(3));
    let calls = a_records.calls();
    assert_eq!(calls.len(), 2 * ROUNDS);
    for call in &calls {
        assert_eq!(call.critical, &*call.callee == "svc-c2", "{call:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_off_the_critical_path_does_not_count_even_when_its_wait_is_larger() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // C1 waits 45 ms and finishes first; C2 waits 20 ms itself, then D waits 35 ms, so C2 finishes last. The
    // largest wait on A's critical path is D's 35 ms, not C1's 45 ms.
    let (a, _) = traced("svc-a");
    let (c1, _) = traced("svc-c1");
    let (c2, _) = traced("svc-c2");
    let (d, _) = traced("svc-d");
    let d_addr = serve_grpc(&d, Behavior::sleep(35)).await;
    let c1_addr = serve_http(&c1, Behavior::sleep(45)).await;
    let c2_addr = serve_http(&c2, Behavior::sleep(20).then(vec![Callee::grpc(&c2, d_addr)])).await;
    let a_addr =
        serve_http(&a, Behavior::default().then(vec![Callee::http(&a, c1_addr), Callee::http(&a, c2_addr)])).await;
    let responses = drive(a_addr, &[]).await.responses;
    let mut waits = Vec::new();
    for response in &responses {
        let header = response.headers()[TIMING_HEADER].to_str().unwrap();
        assert!(header.contains(";k=l;at=svc-d"), "A's timing header: {header}");
        waits.push(Duration::from_micros(field(header, "w")));
    }
    assert_near("A's largest wait", median(waits), 35.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_bound_handler_shows_busy() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (a, a_records) = traced("svc-a");
    let addr = serve_http(&a, Behavior { spin: Duration::from_millis(30), ..Default::default() }).await;
    drive(addr, &[&a_records]).await;
    let requests = a_records.requests();
    let busy = median(requests.iter().map(|r| r.busy).collect());
    assert_near("busy", busy, 30.0);
    let local_wait = median(requests.iter().map(off_cpu).collect());
    assert!(local_wait < Duration::from_millis(3), "local_wait {local_wait:?} should be small next to busy {busy:?}");
}

/// Runs a traced axum server on its own single-threaded runtime whose handler waits 5 ms on a blocking thread
/// (so the wake comes from another thread, at the right instant). With `hogs`, two tasks on the same runtime burn
/// the CPU in 10 ms slices, so the woken handler waits for the thread.
fn cpu_wait_on_single_thread_runtime(hogs: bool) -> Vec<Duration> {
    let (tracer, records) = traced("svc-a");
    let (addr_sender, addr_receiver) = std::sync::mpsc::channel();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server_stop = stop.clone();
    let server = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let app = axum::Router::new()
                .route(
                    "/",
                    axum::routing::get(|| async {
                        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(5))).await.unwrap();
                        "ok"
                    }),
                )
                .layer(tracer.server_layer());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_sender.send(listener.local_addr().unwrap()).unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await });
            if hogs {
                for _ in 0..2 {
                    let stop = server_stop.clone();
                    tokio::spawn(async move {
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            spin(Duration::from_millis(10));
                            tokio::task::yield_now().await;
                        }
                    });
                }
            }
            while !server_stop.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    });
    let addr = addr_receiver.recv().unwrap();
    let client_runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    client_runtime.block_on(async {
        let client = plain_client();
        for _ in 0..10 {
            get_from_outside(&client, addr).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
    records.requests().iter().map(|r| r.cpu_wait).collect()
}

#[test]
fn a_saturated_runtime_shows_cpu_wait() {
    let _serial = ONE_AT_A_TIME.blocking_lock();
    let idle = median(cpu_wait_on_single_thread_runtime(false));
    let saturated = median(cpu_wait_on_single_thread_runtime(true));
    // Expected with hogs: the rest of the running 10 ms slice, often plus the other hog's (≈ 5–15 ms).
    assert!(
        (Duration::from_millis(2)..=Duration::from_millis(30)).contains(&saturated),
        "cpu_wait with CPU hogs: {saturated:?} (idle: {idle:?})"
    );
    assert!(idle < Duration::from_millis(1), "cpu_wait on an idle runtime: {idle:?}");
}

/// A field of a timing header, as a number.
fn field(header: &str, key: &str) -> u64 {
    header
        .split(';')
        .find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {header}"))
}

/// A (axum) → B (axum) → C (tonic), optionally through a delaying proxy; returns A's timing headers.
async fn chain_headers(b_sleep: u64, c_sleep: u64, link_delay: Option<u64>) -> Vec<String> {
    let (a, _) = traced("svc-a");
    let (b, _) = traced("svc-b");
    let (c, _) = traced("svc-c");
    let c_addr = serve_grpc(&c, Behavior::sleep(c_sleep)).await;
    let c_target = match link_delay {
        Some(delay) => delaying_proxy(c_addr, Duration::from_millis(delay)).await,
        None => c_addr,
    };
    let b_addr = serve_http(&b, Behavior::sleep(b_sleep).then(vec![Callee::grpc(&b, c_target)])).await;
    let a_addr = serve_http(&a, Behavior::sleep(1).then(vec![Callee::http(&a, b_addr)])).await;
    drive(a_addr, &[])
        .await
        .responses
        .iter()
        .map(|r| r.headers()[TIMING_HEADER].to_str().unwrap().to_string())
        .collect()
}

fn assert_points_at(headers: &[String], at: &str, expected_ms: f64) {
    for header in headers {
        assert!(header.starts_with("v=1;s=svc-a;"), "{header}");
        assert!(header.contains(at), "A's timing header {header} should point at {at}");
    }
    let waits = headers.iter().map(|h| Duration::from_micros(field(h, "w"))).collect();
    assert_near("A's largest wait", median(waits), expected_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entry_header_points_at_a_slow_leaf() {
    let _serial = ONE_AT_A_TIME.lock().await;
    assert_points_at(&chain_headers(2, 40, None).await, ";k=l;at=svc-c;", 40.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entry_header_points_at_a_slow_link() {
    let _serial = ONE_AT_A_TIME.lock().await;
    assert_points_at(&chain_headers(2, 2, Some(40)).await, ";k=n;at=svc-b>svc-c;", 40.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entry_header_points_at_a_slow_middle_service() {
    let _serial = ONE_AT_A_TIME.lock().await;
    assert_points_at(&chain_headers(40, 2, None).await, ";k=l;at=svc-b;", 40.0);
}
