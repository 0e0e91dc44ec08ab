//! Local mode end to end: real replicas on loopback, real agents answering real `Advisor.Recommend` calls, the
//! operator's engine scaling them; plus draining under load and the demo command's refusal of bad topologies.

use std::{
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use rootscale_examples::local::{
    SHIPPED,
    cluster::{Cluster, ClusterConfig},
    load::Load,
    policy::Policy,
    run::{RunConfig, run},
    scenario::RateSchedule,
    topology::Topology,
};

/// The runs share two cores; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn shop() -> Topology {
    Topology::parse(SHIPPED[0].1, "shop.yaml").unwrap()
}

#[test]
fn the_injected_bottleneck_and_only_it_is_scaled_and_the_slo_comes_back() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut config = RunConfig::new(shop(), Policy::Rootscale).unwrap();
    config.faults = vec!["payments=capacity:4@6s".parse().unwrap()];
    config.duration = Duration::from_secs(30);
    config.seed = 7;
    let timeline = run(&config, |_, _, _| {}).unwrap();
    let summary = &timeline.summary;
    let report = format!("{:#?}\n{:#?}", timeline.actions, summary);
    assert!(timeline.detections[0].detected_at_s.is_some(), "never found: {report}");
    assert!(!timeline.actions.is_empty(), "nothing scaled: {report}");
    for action in &timeline.actions {
        assert_eq!(action.service, "payments", "a service that was not the bottleneck was scaled: {report}");
        assert!(action.to > action.from, "{report}");
    }
    for (service, replicas) in &summary.final_replicas {
        let initial = config.topology.spec(service).unwrap().replicas;
        if service == "payments" {
            assert!(*replicas > initial, "{report}");
        } else {
            assert_eq!(*replicas, initial, "{service}: {report}");
        }
    }
    let slo_ms = config.topology.slo.as_secs_f64() * 1e3;
    let before = summary.latency_before_ms.unwrap();
    let worst = summary.latency_worst_ms.unwrap();
    let after = summary.latency_after_ms.unwrap();
    assert!(before < slo_ms && worst > slo_ms, "the fault did not break the SLO: {report}");
    assert!(after < slo_ms, "p95 {after} ms over the last 10 s is not back under the SLO: {report}");
    assert_eq!((summary.failed, summary.ok), (0, summary.sent), "{report}");
}

#[test]
fn a_healthy_run_adds_no_replica() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut config = RunConfig::new(shop(), Policy::Rootscale).unwrap();
    config.faults.clear();
    config.duration = Duration::from_secs(20);
    config.seed = 3;
    let timeline = run(&config, |_, _, _| {}).unwrap();
    assert!(timeline.actions.is_empty(), "{:#?}", timeline.actions);
    assert!(timeline.ticks.iter().all(|tick| tick.services.iter().all(|row| row.replicas == 1)));
    assert!(timeline.summary.sent > 1000, "{:?}", timeline.summary);
}

#[test]
fn replicas_start_and_drain_under_load_without_losing_a_request() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let config = ClusterConfig {
        window: Duration::from_secs(1),
        mode: Default::default(),
        seed: 5,
        cpu_model: Default::default(),
        mesh_keys: std::sync::Arc::new(rootscale_tracer::identity::KeyRing::fixed(
            rootscale_tracer::identity::MeshKeys::generate().unwrap(),
        )),
        sample: Default::default(),
    };
    let cluster = Cluster::start(shop(), &config).unwrap();
    let load = Load::start(runtime.handle(), cluster.entry_registry().unwrap(), RateSchedule::constant(150.0), 5);
    std::thread::sleep(Duration::from_secs(1));
    // The entry (HTTP, balanced by the load generator), a gRPC service in the middle and an HTTP one with a
    // callee of its own: up to three replicas and back down to one, over and over.
    let started = Instant::now();
    let mut up = true;
    while started.elapsed() < Duration::from_secs(10) {
        for service in ["frontend", "catalog", "checkout"] {
            cluster.scale(service, if up { 3 } else { 1 }).unwrap();
        }
        up = !up;
        std::thread::sleep(Duration::from_millis(700));
    }
    for service in ["frontend", "catalog", "checkout"] {
        cluster.scale(service, 1).unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    load.stop();
    let (sent, ok, failed) = load.totals();
    cluster.stop();
    assert!(sent > 1000, "{sent}");
    assert_eq!((ok, failed), (sent, 0), "requests were lost while replicas came and went");
}

fn demo_with_topology(text: &str) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!("rootscale-demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{:x}.yaml", text.len() * 31 + text.bytes().map(usize::from).sum::<usize>()));
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--plain", "--duration", "5s", "--no-fault", "--topology"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_topology_files_are_refused_with_the_line_and_nothing_starts() {
    let good = SHIPPED[0].1;
    let line_of = |needle: &str| good.lines().position(|line| line.contains(needle)).unwrap() + 1;
    let cases = [
        (
            good.replacen("      - call: catalog", "      - call: catalogue", 1),
            line_of("      - call: catalog"),
            "calls `catalogue`, which is not a service here",
        ),
        (
            good.replacen("      - call: payments", "      - call: frontend", 1),
            line_of("      - call: payments"),
            "calls form a cycle: frontend -> checkout -> frontend",
        ),
        (good.replacen("    capacity: 4\n", "    capacity: -4\n", 1), line_of("    capacity: 4"), "capacity is -4"),
        (
            good.replacen("    cpu: 2ms\n", "    cpu: 2ms\n    threads: 8\n", 1),
            line_of("    cpu: 2ms") + 1,
            "unknown field `threads`",
        ),
    ];
    for (text, line, what) in cases {
        let (ok, stdout, stderr) = demo_with_topology(&text);
        assert!(!ok, "accepted: {stdout}");
        assert!(stderr.contains(&format!("line {line}")), "{stderr} does not name line {line}");
        assert!(stderr.contains(what), "{stderr} does not say {what}");
        assert!(!stdout.contains("Starting"), "something started: {stdout}");
    }
}

#[test]
fn bad_flags_are_refused_before_anything_starts() {
    for (args, what) in [
        (vec!["--inject", "payments=melt:2@5s"], "unknown kind `melt`"),
        (vec!["--inject", "nobody=cpu:2@5s"], "no service `nobody`"),
        (vec!["--policy", "guess"], "unknown policy `guess`"),
        (vec!["--rate", "100,50"], "needs @TIME"),
        (vec!["--topology", "/nonexistent/file.yaml"], "/nonexistent/file.yaml"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_demo")).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} accepted");
        assert!(stderr.contains(what), "{args:?}: {stderr}");
        assert!(!String::from_utf8_lossy(&output.stdout).contains("Starting"), "{args:?}");
    }
}
