//! Bottleneck localization with real services and real agents on loopback: the matrix's topology files
//! (`examples/topologies/matrix/`) run as local mode's replicas under open-loop load (150 requests/s; each service
//! holds one of 64 workers for 10 ms and 1 ms of CPU per request), with nothing scaling them. Every scenario
//! injects one fault after a warm-up window and reads every agent's verdict after each window (1 s windows).
//!
//! Stated tolerances: "within 2 windows" means in the first or second full window after the one the fault began
//! in; the replica recommendation for a pool at 3× its capacity must be 3 ± 1.

use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use rootscale_examples::{
    local::{
        scenario::{Fault, FaultKind},
        topology::Topology,
    },
    localization::{Running, Settings, matrix_topology, run_scenario},
};
use rootscale_proto::v1::{RecommendRequest, Verdict, advisor_client::AdvisorClient};
use rootscale_tracer::{
    SampleRate,
    decide::AggregationMode,
    identity::peer::{OPERATOR_PROOF_METADATA, operator_proof},
};

/// Scenarios share the machine's two cores: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn settings() -> Settings {
    Settings::new().expect("a mesh key")
}

/// The matrix's faults of one kind on `topology` (its `demo:` section).
fn faults(topology: &Topology, kinds: &[&str]) -> Vec<Fault> {
    topology.demo.faults.iter().filter(|fault| kinds.contains(&fault.kind_name())).cloned().collect()
}

/// Every service with a pool cut to one worker (about 90 requests/s against 150) and with CPU ×9 (1.35 cores of
/// demand on one).
fn check_every_service(name: &str) {
    check_every_service_with(name, &settings());
}

fn check_every_service_with(name: &str, settings: &Settings) {
    let topology = matrix_topology(name).expect("a matrix topology");
    let scenarios = faults(&topology, &["capacity", "cpu"]);
    assert_eq!(scenarios.len(), 2 * topology.services.len(), "{name}: every service, both faults");
    let mut failures = Vec::new();
    for fault in scenarios {
        let result = run_scenario(&topology, settings, &fault, 2).expect("scenario runs");
        eprintln!("{name} {fault}: {result:?}");
        if result.detected_in.is_none() {
            failures.push(format!("{fault}: {}", result.misses.join("; ")));
            continue;
        }
        // A decision made on a sample says so.
        let reason = &result.last_verdicts[&fault.service].reason;
        let says_sampled = reason.contains(&format!("then one in {}", settings.sample.every()));
        if says_sampled != settings.sample.is_sampling() {
            failures.push(format!("{fault}: the root cause's reason is wrong about sampling: {reason}"));
        }
    }
    assert!(failures.is_empty(), "{name}: not localised within 2 windows:\n{}", failures.join("\n"));
}

/// The same, with every replica at `ROOTSCALE_SAMPLE=1/16`: the first request of each sixteenth of a window and one
/// in 16 of the rest, about 25 of the entry's 150 requests a window, counts weighted.
#[test]
fn sampled_one_in_sixteen_every_topology_every_service_every_fault() {
    let _serial = serial();
    let settings = Settings { sample: SampleRate::one_in(16).expect("a rate"), ..settings() };
    for name in ["chain-4", "diamond", "fan-out"] {
        check_every_service_with(name, &settings);
    }
}

#[test]
fn chain_of_four_every_service_every_fault() {
    let _serial = serial();
    check_every_service("chain-4");
}

#[test]
fn diamond_every_service_every_fault() {
    let _serial = serial();
    check_every_service("diamond");
}

#[test]
fn fan_out_with_parallel_calls_every_service_every_fault() {
    let _serial = serial();
    check_every_service("fan-out");
}

#[test]
fn a_slowed_link_is_network_at_the_caller() {
    let _serial = serial();
    let topology = matrix_topology("chain-4").unwrap();
    let links = faults(&topology, &["link"]);
    assert_eq!(links.len(), 3, "the links into svc-b, svc-c and svc-d");
    // The link into svc-c (from svc-b, the middle) and into svc-b (from the entry).
    for fault in links.iter().filter(|fault| ["svc-b", "svc-c"].contains(&fault.service.as_str())) {
        let result = run_scenario(&topology, &settings(), fault, 2).expect("scenario runs");
        eprintln!("{fault}: {result:?}");
        assert!(result.detected_in.is_some(), "{fault}: {}", result.misses.join("; "));
        assert!(result.root_causes.is_empty(), "a slow link is nobody's root cause: {:?}", result.root_causes);
    }
}

#[test]
fn a_healthy_run_under_moderate_load_has_no_root_cause() {
    let _serial = serial();
    for name in ["chain-4", "diamond", "fan-out"] {
        let running = Running::start(matrix_topology(name).unwrap(), &settings()).expect("starts");
        let first = running.window_now();
        for k in 2..=4 {
            running.wait_for_window(first + k);
            let verdicts = running.verdicts();
            assert_eq!(verdicts.len(), 4, "{name}: every service decided");
            for (service, seen) in verdicts {
                assert!(seen.window_id >= first + k, "{name}: {service} has not decided window {}", first + k);
                // Not triggered: healthy, or idle where a service's share of the load is small.
                assert!(
                    matches!(seen.verdict, Verdict::Healthy | Verdict::Idle),
                    "{name}: {service}: {:?}: {}",
                    seen.verdict,
                    seen.reason
                );
            }
        }
        let (sent, ok, failed) = running.load_totals();
        // About 3.5 s at 150 requests/s.
        assert!((300..=800).contains(&ok) && failed == 0, "{name}: {sent} sent, {ok} ok, {failed} failed");
        running.stop();
    }
}

#[test]
fn sum_mode_finds_two_simultaneous_bottlenecks() {
    let _serial = serial();
    let topology = matrix_topology("fan-out").unwrap();
    let settings = Settings { mode: AggregationMode::Sum, ..settings() };
    let running = Running::start(topology, &settings).expect("starts");
    running.wait_for_window(running.window_now());
    for service in ["svc-b", "svc-d"] {
        let fault = Fault { service: service.into(), kind: FaultKind::Capacity(64.0), at: Duration::ZERO, until: None };
        running.inject(&fault).unwrap();
    }
    let injected = running.window_now();
    let mut found = false;
    let mut last = String::new();
    for k in 1..=2 {
        running.wait_for_window(injected + k);
        let verdicts = running.verdicts();
        let root_causes: Vec<&String> =
            verdicts.iter().filter(|(_, s)| s.verdict == Verdict::RootCause).map(|(name, _)| name).collect();
        let entry = &verdicts["svc-a"];
        last = format!(
            "root causes {root_causes:?}; svc-a {:?} to {:?}: {}",
            entry.verdict, entry.delegated_to, entry.reason
        );
        if root_causes == ["svc-b", "svc-d"] && entry.delegated_to == ["svc-b", "svc-d"] {
            found = true;
            break;
        }
    }
    running.stop();
    assert!(found, "sum mode did not find both bottlenecks within 2 windows: {last}");
}

#[test]
fn a_crashed_neighbour_leaves_the_request_path_alone_and_degrades_the_verdict() {
    let _serial = serial();
    let running = Running::start(matrix_topology("chain-4").unwrap(), &settings()).expect("starts");
    running.wait_for_window(running.window_now());
    let before = running.load_totals();
    running.crash("svc-d").unwrap();
    let crashed = running.window_now();
    running.wait_for_window(crashed + 1);
    running.wait_for_window(crashed + 2);
    let verdicts = running.verdicts();
    assert!(!verdicts.contains_key("svc-d"), "svc-d has no replica left");
    let caller = &verdicts["svc-c"];
    assert_eq!(caller.verdict, Verdict::InsufficientData, "svc-c: {}", caller.reason);
    assert!(caller.reason.contains("svc-d"), "{}", caller.reason);
    let snapshot = running.views()["svc-c"][0].snapshot();
    assert!(snapshot.neighbors.iter().any(|n| n.service == "svc-d" && n.stale), "{:?}", snapshot.neighbors);
    // The request path: every request still gets an answer (an error from svc-c), promptly.
    let after = running.load_totals();
    let (sent, ok, failed) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    // (A few requests sent just before the crash may still succeed; a few sent last may still be out.)
    assert!(sent > 200 && ok <= 5 && ok + failed + 10 >= sent, "{sent} sent, {ok} ok, {failed} failed");
    running.stop();
}

#[test]
fn a_pool_at_three_times_its_capacity_asks_for_about_three_times_the_replicas() {
    let _serial = serial();
    // svc-b: one worker for 20 ms = 50 requests/s; 150 requests/s arrive.
    let topology = Topology::parse(
        "name: pool
entry: svc-a
slo: 100ms
services:
  - name: svc-a
    protocol: http
    capacity: 64
    cpu: 1ms
    service_time: {distribution: constant, value: 10ms}
    calls: [{call: svc-b}]
  - name: svc-b
    protocol: grpc
    capacity: 1
    service_time: {distribution: constant, value: 20ms}
demo:
  rate: 150
",
        "pool",
    )
    .unwrap();
    let settings = settings();
    let keys = settings.mesh_keys.clone();
    let running = Running::start(topology, &settings).expect("starts");
    let first = running.window_now();
    running.wait_for_window(first + 2);
    let agent = running.views()["svc-b"][0].snapshot();
    let address = agent.neighbors.iter().find(|n| n.service == "svc-a").map(|n| n.agent.clone()).unwrap_or_default();
    assert!(!address.is_empty(), "svc-b knows svc-a's agent");
    // Ask svc-b's agent as the operator does, over gRPC.
    let b_agent = running.agent_addr("svc-b").expect("svc-b's agent");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let answer = runtime.block_on(async {
        let mut advisor = AdvisorClient::connect(format!("http://{b_agent}")).await.unwrap();
        let request = RecommendRequest { current_replicas: 1, target_utilization: 1.0, ..Default::default() };
        // With the operator's proof, made with the mesh key.
        let proof = operator_proof(&keys.current(), "Recommend", &prost::Message::encode_to_vec(&request));
        let mut request = tonic::Request::new(request);
        request.metadata_mut().insert(OPERATOR_PROOF_METADATA, proof);
        advisor.recommend(request).await.unwrap().into_inner()
    });
    running.stop();
    let decision = answer.decision.unwrap();
    let recommendation = answer.recommendation.unwrap();
    assert_eq!(decision.verdict(), Verdict::RootCause, "{decision:?}");
    assert!(
        (2..=4).contains(&recommendation.desired_replicas),
        "desired {} ({})",
        recommendation.desired_replicas,
        recommendation.reason
    );
}
