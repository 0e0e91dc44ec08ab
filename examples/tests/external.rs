//! Local mode with a service of another language: `examples/topologies/external/polyglot.yaml` runs the Python
//! service (`examples/python/service.py`, standard library only) behind rootscale-proxy between two modelled
//! services. With `index`'s capacity cut, `index` is the root cause and the only service scaled, and the Python
//! service delegates to it through the sidecar — passing the trace context on (measured per request) and not
//! (estimated for the window, and its decision says so).

use std::time::Duration;

use rootscale_examples::local::{
    policy::Policy,
    run::{RunConfig, Timeline, run},
    topology::{Runtime, Topology},
};

/// The shipped file, with the program's path made absolute (tests run in `examples/`, the file is written for the
/// repository root), and `extra` arguments for it.
fn polyglot(extra: &[&str]) -> Topology {
    let dir = env!("CARGO_MANIFEST_DIR");
    let path = format!("{dir}/topologies/external/polyglot.yaml");
    let mut topology = Topology::load(std::path::Path::new(&path)).unwrap();
    let search = topology.services.iter_mut().find(|s| s.name == "search").unwrap();
    let Runtime::External { command } = &mut search.runtime else { panic!("search is not external") };
    assert_eq!(command[1], "examples/python/service.py", "the shipped file changed");
    command[1] = format!("{dir}/python/service.py");
    command.extend(extra.iter().map(|arg| arg.to_string()));
    topology
}

fn report(timeline: &Timeline) -> String {
    let ticks: Vec<String> = timeline
        .ticks
        .iter()
        .map(|tick| {
            let rows: Vec<String> =
                tick.services.iter().map(|r| format!("{}={}:{}{}", r.name, r.replicas, r.verdict, r.detail)).collect();
            format!("t={} p95={:?} {}", tick.t, tick.entry.latency_ms.map(|ms| ms.round()), rows.join(" "))
        })
        .collect();
    format!("{:#?}\n{}", timeline.actions, ticks.join("\n"))
}

fn localized_through_the_sidecar(extra: &[&str], estimated: bool) {
    let mut config = RunConfig::new(polyglot(extra), Policy::Rootscale).unwrap();
    config.faults = vec!["index=capacity:4@6s".parse().unwrap()];
    config.duration = Duration::from_secs(20);
    config.seed = 3;
    let timeline = run(&config, |_, _, _| {}).unwrap();
    let report = report(&timeline);
    assert!(timeline.summary.sent > 2_000, "{report}");
    let found = timeline.detections[0].detected_at_s.unwrap_or_else(|| panic!("never found: {report}"));
    // The fault starts at 6 s; the tick of t = 7 covers the second after it: found within two windows.
    assert!(found <= 8, "found {} s after the fault: {report}", found - 6);
    assert!(!timeline.actions.is_empty(), "nothing scaled: {report}");
    for action in &timeline.actions {
        assert_eq!(action.service, "index", "another service was scaled: {report}");
    }
    // The Python service, through its sidecar, passes the delegation on while index is the root cause.
    let search_delegated = timeline.ticks.iter().filter(|tick| tick.t > 6).any(|tick| {
        let says = |name: &str, verdict: &str| tick.services.iter().any(|r| r.name == name && r.verdict == verdict);
        says("search", "delegated") && says("index", "root-cause")
    });
    assert!(search_delegated, "search never delegated while index was the root cause: {report}");
    let search_said_estimate =
        timeline.ticks.iter().flat_map(|tick| &tick.services).any(|r| r.name == "search" && r.own_wait_estimated);
    assert_eq!(search_said_estimate, estimated, "estimate said: {search_said_estimate}: {report}");
}

#[test]
fn a_python_service_behind_the_sidecar_delegates_to_its_slow_callee_with_and_without_trace_context() {
    localized_through_the_sidecar(&[], false);
    localized_through_the_sidecar(&["--no-propagate"], true);
}
