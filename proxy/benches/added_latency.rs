//! What the sidecar adds to a request: the same plain axum application called directly and through the proxy,
//! inbound (caller → proxy → application) and outbound (application's call → proxy's HTTP proxy port → callee),
//! at a steady open-loop 1,000 requests/s, rounds alternated so the machine's noise falls on both alike. Reports the
//! latency at p50 and p99 for each path (the median over rounds), what the proxy adds, and the CPU time the process
//! spent per request beyond the direct path's — the proxy's own work, since everything else is the same.
//!
//! `cargo bench -p rootscale-proxy --bench added_latency [-- <rounds> <seconds per round>]`

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rootscale_proxy::{Proxy, ProxyConfig, Routes};
use rootscale_tracer::Agent;

const RATE: u64 = 1000;

/// CPU time this process has used (user + system), from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; 100 ticks a second on Linux.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Sends `RATE` requests a second for `seconds` to `target` with `host`; every latency, in microseconds.
async fn round(client: &Client<HttpConnector, Empty<Bytes>>, target: SocketAddr, host: &str, seconds: u64) -> Vec<u64> {
    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let mut sent = Vec::new();
    for _ in 0..RATE * seconds {
        ticks.tick().await;
        let (client, host) = (client.clone(), host.to_string());
        sent.push(tokio::spawn(async move {
            let started = Instant::now();
            let request = Request::get(format!("http://{target}/")).header("host", host).body(Empty::new()).ok()?;
            let response = client.request(request).await.ok()?;
            response.into_body().collect().await.ok()?;
            Some(started.elapsed().as_micros() as u64)
        }));
    }
    let mut latencies = Vec::new();
    for request in sent {
        if let Ok(Some(latency)) = request.await {
            latencies.push(latency);
        }
    }
    latencies.sort_unstable();
    latencies
}

fn at(sorted: &[u64], percentile: f64) -> u64 {
    sorted
        .get(((sorted.len() as f64 * percentile / 100.0) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let numbers: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rounds = numbers.first().copied().unwrap_or(5).max(1);
    let seconds = numbers.get(1).copied().unwrap_or(3).max(1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, Router::new().route("/", get(|| async { "hello" }))).into_future());
    let agent = Agent::builder("bench").listen("127.0.0.1:0".parse().unwrap()).start().await.unwrap();
    let mut config = ProxyConfig::new(app);
    config.inbound = "127.0.0.1:0".parse().unwrap();
    config.outbound = "127.0.0.1:0".parse().unwrap();
    config.routes = Routes::default().with("app", app.to_string().parse().unwrap()).unwrap();
    let proxy = Proxy::start(&config, &agent).await.unwrap();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    // Three paths: direct; inbound (the proxy in front of the application); outbound (a call through the HTTP
    // proxy port, routed by its Host to the application).
    let paths =
        [("direct", app, "app"), ("inbound", proxy.inbound_addr(), "app"), ("outbound", proxy.outbound_addr(), "app")];
    round(&client, app, "app", 1).await; // warm-up: connections made, code paged in
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new(), Vec::new()); paths.len()];
    for r in 0..rounds {
        for (index, (_, target, host)) in paths.iter().enumerate() {
            let cpu = cpu_time();
            let latencies = round(&client, *target, host, seconds).await;
            let cpu_us = (cpu_time() - cpu).as_micros() as f64 / latencies.len().max(1) as f64;
            results[index].0.push(at(&latencies, 50.0) as f64);
            results[index].1.push(at(&latencies, 99.0) as f64);
            results[index].2.push(cpu_us);
        }
        eprintln!("round {} of {rounds} done", r + 1);
    }
    println!(
        "rootscale-proxy added latency: {RATE} requests/s, {rounds} rounds of {seconds} s per path, alternated; medians over rounds"
    );
    println!(
        "{:<10} {:>10} {:>10} {:>14} {:>12} {:>12}",
        "path", "p50 (µs)", "p99 (µs)", "CPU/req (µs)", "+p50 (µs)", "+p99 (µs)"
    );
    let direct = (median(results[0].0.clone()), median(results[0].1.clone()), median(results[0].2.clone()));
    for ((name, _, _), (p50, p99, cpu)) in paths.iter().zip(&results) {
        let (p50, p99, cpu) = (median(p50.clone()), median(p99.clone()), median(cpu.clone()));
        println!("{name:<10} {p50:>10.0} {p99:>10.0} {cpu:>14.1} {:>12.0} {:>12.0}", p50 - direct.0, p99 - direct.1);
    }
    println!(
        "(CPU per request is the whole process's: load generator, application and, on the proxied paths, the proxy; the difference from direct is the proxy's.)"
    );
    proxy.stop();
}
