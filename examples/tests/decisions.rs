//! Decisions in local mode, end to end with real replicas: the cascade through thread-per-request pools, the size
//! of the first step, a burst that scales nothing, and a fault that ends followed by the scale-down.

use std::{sync::Mutex, time::Duration};

use rootscale_examples::local::{
    SHIPPED,
    policy::Policy,
    run::{RunConfig, Timeline, run},
    topology::Topology,
};

/// The runs share two cores; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn shipped(name: &str) -> Topology {
    let (_, text) = SHIPPED.iter().find(|(shipped, _)| *shipped == name).unwrap();
    Topology::parse(text, &format!("{name}.yaml")).unwrap()
}

fn report(timeline: &Timeline) -> String {
    let verdicts: Vec<String> = timeline
        .ticks
        .iter()
        .map(|tick| {
            let services: Vec<String> = tick
                .services
                .iter()
                .map(|row| format!("{}={}:{}{}", row.name, row.replicas, row.verdict, row.detail))
                .collect();
            format!("t={} p95={:?} {}", tick.t, tick.entry.latency_ms.map(|ms| ms.round()), services.join(" "))
        })
        .collect();
    format!("{:#?}\n{:#?}\n{}", timeline.actions, timeline.summary, verdicts.join("\n"))
}

#[test]
fn a_slow_store_behind_thread_per_request_callers_is_the_root_cause_and_only_it_scales() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topology = shipped("threads");
    let callers = ["web", "api"];
    for caller in callers {
        assert_eq!(topology.spec(caller).unwrap().pool, rootscale_tracer::decide::PoolScope::Request);
    }
    let mut config = RunConfig::new(topology, Policy::Rootscale).unwrap();
    config.faults = vec!["store=capacity:4@6s".parse().unwrap()];
    config.duration = Duration::from_secs(30);
    config.seed = 11;
    let timeline = run(&config, |_, _, _| {}).unwrap();
    let report = report(&timeline);
    let found = timeline.detections[0].detected_at_s.unwrap_or_else(|| panic!("never found: {report}"));
    assert!(found <= 9, "found {} s after the fault: {report}", found - 6);
    assert!(!timeline.actions.is_empty(), "nothing scaled: {report}");
    for action in &timeline.actions {
        assert_eq!(action.service, "store", "a caller was scaled: {report}");
        assert!(action.to > action.from, "{report}");
    }
    // While the cascade lasts (from the fault to the first second the entry is back under its SLO), the callers
    // mostly delegate — their pools are full of workers waiting on the store — and the store is the root cause
    // whenever it has data (a replica just added answers `insufficient-data` for its first window). The tick of
    // t = 7 s covers the second after the fault.
    let slo_ms = config.topology.slo.as_secs_f64() * 1e3;
    let cascade: Vec<_> =
        timeline.ticks.iter().skip(6).take_while(|tick| tick.entry.latency_ms.is_none_or(|ms| ms > slo_ms)).collect();
    assert!(cascade.len() >= 2, "the fault never broke the SLO: {report}");
    let said = |service: &str, verdict: &str| {
        cascade.iter().filter(|tick| tick.services.iter().any(|r| r.name == service && r.verdict == verdict)).count()
    };
    for caller in callers {
        assert!(said(caller, "delegated") * 2 > cascade.len(), "{caller} did not mostly delegate: {report}");
    }
    let store_knew = cascade.len() - said("store", "insufficient-data");
    assert!(store_knew >= 1 && said("store", "root-cause") * 2 > store_knew, "{report}");
    let summary = &timeline.summary;
    for (service, replicas) in &summary.final_replicas {
        if service != "store" {
            assert_eq!(*replicas, 1, "{service}: {report}");
        }
    }
    assert!(summary.latency_after_ms.unwrap() < slo_ms, "the SLO did not come back: {report}");
    assert!(summary.recovered_after_s.is_some(), "{report}");
}

#[test]
fn a_pushed_decision_scales_within_a_window_without_waiting_for_the_sync() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut config = RunConfig::new(shipped("shop"), Policy::Rootscale).unwrap();
    config.faults = vec!["payments=capacity:4@5s".parse().unwrap()];
    // No periodic sync happens in this run: only a push can scale anything.
    config.sync = Duration::from_secs(60);
    config.duration = Duration::from_secs(15);
    config.seed = 2;
    let timeline = run(&config, |_, _, _| {}).unwrap();
    let report = report(&timeline);
    let first = timeline.actions.first().unwrap_or_else(|| panic!("nothing scaled: {report}"));
    assert_eq!(first.service, "payments", "{report}");
    let pushed_after = first.pushed_after_s.unwrap_or_else(|| panic!("not made on a push: {report}"));
    let window = config.window.as_secs_f64();
    assert!((0.0..window).contains(&pushed_after), "{pushed_after} s after its window closed: {report}");
    // The fault at 5 s, two windows of root cause (the first one holds), the push: well before any sync.
    assert!(first.at_s < 5.0 + 4.0 * window, "{report}");
    assert!(timeline.actions.iter().all(|a| a.service == "payments" && a.pushed_after_s.is_some()), "{report}");
}

#[test]
fn the_first_step_is_within_one_replica_of_the_demand() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut config = RunConfig::new(shipped("shop"), Policy::Rootscale).unwrap();
    let rate = 200.0;
    config.rate = rootscale_examples::local::scenario::RateSchedule::constant(rate);
    config.faults = vec!["payments=capacity:4@6s".parse().unwrap()];
    config.duration = Duration::from_secs(30);
    config.seed = 5;
    // What payments needs after its pool of 4 shrinks to 1: 30 % of the requests reach it, each holds a slot for its
    // service time and its CPU time; at the 70 % target that is ceil(demand / 0.7) replicas.
    let payments = config.topology.spec("payments").unwrap();
    let hold = (payments.service_time.mean() + payments.cpu).as_secs_f64();
    let needed = (rate * 0.3 * hold / 1.0 / 0.7).ceil() as u32;
    assert_eq!(needed, 3, "the scenario changed");
    let timeline = run(&config, |_, _, _| {}).unwrap();
    let report = report(&timeline);
    // (At this rate `recommend` runs near its CPU target too and may get a replica of its own; not this test's.)
    let first = timeline
        .actions
        .iter()
        .find(|a| a.service == "payments")
        .unwrap_or_else(|| panic!("payments was not scaled: {report}"));
    assert_eq!(first.from, 1, "{report}");
    assert!(first.at_s > 6.0, "scaled before the fault: {report}");
    assert!(first.to.abs_diff(needed) <= 1, "first step to {}, the demand needs {needed}: {report}", first.to);
    let slo_ms = config.topology.slo.as_secs_f64() * 1e3;
    assert!(timeline.summary.latency_after_ms.unwrap() < slo_ms, "{report}");
}

#[test]
fn a_one_second_burst_scales_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut config = RunConfig::new(shipped("shop"), Policy::Rootscale).unwrap();
    // Four times the load for 300 ms, as a backlog released upstream would send it. The run's seconds fall in the
    // middle of the agents' windows, so the burst and the frontend's catching up fit in one window.
    config.rate = "150,600@8550ms,150@8850ms".parse().unwrap();
    config.faults.clear();
    config.duration = Duration::from_secs(20);
    config.seed = 9;
    let timeline = run(&config, |_, _, _| {}).unwrap();
    let report = report(&timeline);
    // 20 s at 150 req/s and 0.3 s at 450 more.
    assert!(timeline.summary.sent > 3_000 + 100, "the burst was not sent: {report}");
    let slo_ms = config.topology.slo.as_secs_f64() * 1e3;
    let named =
        timeline.ticks.iter().filter(|tick| tick.services.iter().any(|row| row.verdict == "root-cause")).count();
    assert!(named >= 1, "the burst named no root cause, so this tests nothing: {report}");
    assert!(timeline.ticks.iter().any(|t| t.entry.latency_ms.is_some_and(|ms| ms > slo_ms)), "{report}");
    assert!(timeline.actions.is_empty(), "a burst scaled something: {report}");
}

#[test]
fn after_a_fault_ends_the_service_scales_back_down_once_the_stabilisation_window_has_passed() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut config = RunConfig::new(shipped("shop"), Policy::Rootscale).unwrap();
    // Four times the CPU per request for 15 s: 1.2 cores of demand on one; two replicas carry it at 60 %, not idle.
    let (until, stabilization) = (20.0, 15.0);
    config.faults = vec!["catalog=cpu:4@5s-20s".parse().unwrap()];
    config.scale_down_stabilization = Duration::from_secs_f64(stabilization);
    config.duration = Duration::from_secs(50);
    config.seed = 4;
    let timeline = run(&config, |_, _, _| {}).unwrap();
    let report = report(&timeline);
    let ups: Vec<_> = timeline.actions.iter().filter(|a| a.to > a.from).collect();
    assert!(!ups.is_empty(), "never scaled up: {report}");
    for up in &ups {
        assert_eq!(up.service, "catalog", "{report}");
        assert!(up.at_s < until, "{report}");
    }
    let last_up = ups.last().unwrap().at_s;
    let down: Vec<_> = timeline.actions.iter().filter(|a| a.to < a.from).collect();
    assert!(!down.is_empty(), "never scaled back down: {report}");
    for action in &down {
        assert_eq!(action.service, "catalog", "{report}");
        // The raised count was recommended until the fault ended, and the engine keeps the largest recommendation
        // of the stabilisation window: nothing comes down before both have passed.
        assert!(
            action.at_s >= last_up + stabilization,
            "down {} s after the last step up: {report}",
            action.at_s - last_up
        );
        assert!(
            action.at_s >= until + stabilization - 1.0,
            "down {} s after the fault ended: {report}",
            action.at_s - until
        );
    }
    // Two quiet windows, the stabilisation window and a sync period or two after the end.
    assert!(down.last().unwrap().at_s <= until + stabilization + 8.0, "{report}");
    for (service, replicas) in &timeline.summary.final_replicas {
        assert_eq!(*replicas, config.topology.spec(service).unwrap().replicas, "{service} did not return: {report}");
    }
    assert_eq!(timeline.summary.failed, 0, "{report}");
}
