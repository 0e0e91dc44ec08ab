//! 1,000 annotated Deployments against the in-process stand-in of the Kubernetes API, with every pod's agent
//! stubbed by one fast in-process Advisor (on target: nothing to scale), the dashboard on. Reports the first pass
//! (every Deployment reconciled and its ScalingDecision written) and then the steady state over several resyncs:
//! API requests per Deployment per resync (goal ≤ 1), the time one resync of every Deployment takes (goal ≤ 2 s),
//! and the process's resident memory (goal ≤ 128 MiB; it includes the stand-in API and its objects, so the
//! operator's own share is less).
//!
//! `cargo bench -p rootscale-operator --bench reconcile_1000 [-- <deployments>]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use rootscale_operator::{
    controller::reconcile::OperatorConfig,
    run::{RunConfig, run_until},
};
use rootscale_proto::v1::{Decision, RecommendResponse, Recommendation, Verdict};
use serde_json::json;

/// The resync of the bench: short, so several pass in a short run.
const RESYNC: Duration = Duration::from_secs(5);
/// Resyncs measured at steady state.
const STEADY_RESYNCS: u32 = 3;

/// The process's resident memory, MiB (Linux).
fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// The spans of the rounds in `asked` (sorted instants): a round ends where the agent was not asked for a second.
fn round_spans(asked: &[Instant]) -> Vec<Duration> {
    let mut spans = Vec::new();
    let mut start = None;
    for pair in asked.windows(2) {
        let first = *start.get_or_insert(pair[0]);
        if pair[1].duration_since(pair[0]) > Duration::from_secs(1) {
            spans.push(pair[0].duration_since(first));
            start = None;
        }
    }
    if let (Some(first), Some(last)) = (start, asked.last()) {
        spans.push(last.duration_since(first));
    }
    spans
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1000);
    // An agent on target: nothing to scale.
    let advisor = support::advisor::FixedAdvisor::new(RecommendResponse {
        decision: Some(Decision { verdict: Verdict::Healthy as i32, ..Default::default() }),
        recommendation: Some(Recommendation { usage_ratio: 1.0, ..Default::default() }),
        observed_latency_us: 12_000,
        ..Default::default()
    });
    let agent_port = advisor.clone().serve().await.port();
    let api = support::ApiServer::start().await;
    for i in 0..count {
        let name = format!("svc-{i:04}");
        api.create(
            "deployments",
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": name, "namespace": "bench", "annotations": {
                       "rootscale.dev/enabled": "true", "rootscale.dev/agent-port": agent_port.to_string(),
                       "rootscale.dev/slo-latency": "200ms"}},
                   "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                            "template": {"metadata": {"labels": {"app": name}}}}}),
        );
        api.create(
            "pods",
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": format!("{name}-0"), "namespace": "bench", "labels": {"app": name}},
                   "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
    }
    let memory_before = resident_mib();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let config = RunConfig {
        namespaces: vec!["bench".into()],
        http_addr: "127.0.0.1:0".parse().unwrap(),
        operator: OperatorConfig { resync: RESYNC, ..OperatorConfig::default() },
        leader_election: None,
        dashboard_addr: Some("127.0.0.1:0".parse().unwrap()),
        lease_duration: rootscale_operator::leadership::DEFAULT_LEASE_DURATION,
    };
    let started = Instant::now();
    let operator = tokio::spawn(run_until(api.client(), config, stopped));
    let mut done = 0;
    while started.elapsed() < Duration::from_secs(120) {
        done = api.list("scalingdecisions").iter().filter(|d| !d["status"]["verdict"].is_null()).count();
        if done >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_pass = started.elapsed();
    let first_requests = api.log().len();
    println!(
        "first pass: {done} of {count} Deployments reconciled and recorded in {:.2} s ({:.0} per second); {first_requests} API requests ({:.1} per Deployment)",
        first_pass.as_secs_f64(),
        done as f64 / first_pass.as_secs_f64(),
        first_requests as f64 / count as f64
    );
    // Steady state: let the first pass's requeues settle, then count over whole resyncs.
    tokio::time::sleep(RESYNC).await;
    let (requests_before, asked_before) = (api.log().len(), advisor.asked.lock().unwrap().len());
    tokio::time::sleep(RESYNC * STEADY_RESYNCS).await;
    let (requests_after, asked) = (api.log().len(), advisor.asked.lock().unwrap().clone());
    let reconciles = asked.len() - asked_before;
    let requests = requests_after - requests_before;
    let mut spans = round_spans(&asked[asked_before..]);
    spans.sort();
    let memory = resident_mib();
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), operator).await;
    println!(
        "steady state over {STEADY_RESYNCS} resyncs of {}: {reconciles} reconciles, {requests} API requests = {:.3} per Deployment per resync",
        humantime::format_duration(RESYNC),
        requests as f64 / reconciles.max(1) as f64
    );
    println!(
        "one resync of every Deployment (the agent asked {count} times) took {} (median of {} rounds)",
        spans.get(spans.len() / 2).map_or("?".to_string(), |span| format!("{:.2} s", span.as_secs_f64())),
        spans.len()
    );
    println!(
        "resident memory: {memory:.0} MiB with the operator and its dashboard running ({memory_before:.0} MiB before it started: the stand-in API and its {} objects)",
        count * 2
    );
}
