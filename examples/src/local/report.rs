//! What the demo prints: the live table (redrawn every second on a terminal, one line per second otherwise) and
//! the summary at the end.

use std::fmt::Write;

use crate::local::{
    policy::Action,
    run::{Detection, RECOVERED_FOR, RunConfig, Tick, Timeline},
};

fn opt_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |ms| format!("{ms:.0} ms"))
}

/// The live table for one second.
pub fn table(config: &RunConfig, tick: &Tick, recent: &[Action], detections: &[Detection]) -> String {
    let topology = &config.topology;
    let total = config.duration.as_secs().max(1);
    let filled = (tick.t * 30 / total) as usize;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rootscale demo: {} ({} services), policy {}, seed {}   t = {}s / {}s [{}{}]",
        topology.name,
        topology.services.len(),
        config.policy,
        config.seed,
        tick.t,
        total,
        "#".repeat(filled),
        ".".repeat(30usize.saturating_sub(filled))
    );
    let slo_ms = topology.slo.as_secs_f64() * 1e3;
    let over = tick.entry.latency_ms.is_some_and(|ms| ms > slo_ms);
    let _ = writeln!(
        out,
        "load {:.0} rps -> {}: p{} {} (SLO {:.0} ms){}   ok {} failed {}",
        tick.rate,
        topology.entry,
        topology.slo_percentile,
        opt_ms(tick.entry.latency_ms),
        slo_ms,
        if over { "  OVER SLO" } else { "" },
        tick.entry.ok,
        tick.entry.failed
    );
    for detection in detections {
        let state = if (tick.t as f64) < detection.at_s {
            "not injected yet".to_string()
        } else {
            detection
                .detected_at_s
                .map_or_else(|| "injected, root cause not found yet".into(), |at| format!("root cause found at {at}s"))
        };
        let _ = writeln!(out, "fault {}: {state}", detection.fault);
    }
    let _ = writeln!(
        out,
        "\n{:<16} {:>4} {:>6} {:>17} {:>8} {:>8} {:>8}  verdict",
        "service", "reps", "rps", "p95 / budget ms", "local", "net", "remote"
    );
    for row in &tick.services {
        let _ = writeln!(
            out,
            "{:<16} {:>4} {:>6.0} {:>8.0} / {:<6.0} {:>8.1} {:>8.1} {:>8.1}  {} {}",
            row.name,
            row.replicas,
            row.rps,
            row.latency_ms,
            row.budget_ms,
            row.local_wait_ms,
            row.net_wait_ms,
            row.remote_wait_ms,
            row.verdict,
            row.detail
        );
    }
    if !recent.is_empty() {
        let _ = writeln!(out, "\nscaling:");
        for action in recent {
            let _ = writeln!(
                out,
                "  {:>5.1}s {} {} -> {}  ({})",
                action.at, action.service, action.from, action.to, action.reason
            );
        }
    }
    out
}

/// One line for a second, for logs and pipes.
pub fn line(tick: &Tick, actions: &[Action]) -> String {
    let replicas: Vec<String> = tick
        .services
        .iter()
        .filter(|row| row.replicas > 1 || row.verdict == "root-cause")
        .map(|row| format!("{}={}{}", row.name, row.replicas, if row.verdict == "root-cause" { "*" } else { "" }))
        .collect();
    let mut text = format!(
        "t={:>3}s entry p95 {:>8} ok {:>4} failed {:>3} | {}",
        tick.t,
        opt_ms(tick.entry.latency_ms),
        tick.entry.ok,
        tick.entry.failed,
        replicas.join(" ")
    );
    for action in actions {
        let _ = write!(text, " | scaled {} {} -> {}", action.service, action.from, action.to);
    }
    text
}

/// The summary at the end of a run.
pub fn summary(timeline: &Timeline) -> String {
    let s = &timeline.summary;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nSummary: {} under {}, seed {}, {} s, SLO {:.0} ms at p{}",
        timeline.topology,
        timeline.policy,
        timeline.seed,
        timeline.duration_s,
        timeline.slo_ms,
        timeline.slo_percentile
    );
    for detection in &timeline.detections {
        let found = match detection.detected_at_s {
            Some(at) => format!("root cause found at {at}s ({:.0} s after)", at as f64 - detection.at_s),
            None => "not found".into(),
        };
        let _ = writeln!(out, "  fault {}: {found}", detection.fault);
    }
    if timeline.actions.is_empty() {
        let _ = writeln!(out, "  scaling: none");
    }
    for action in &timeline.actions {
        let pushed = action
            .pushed_after_s
            .map_or_else(String::new, |after| format!(", pushed {:.0} ms after its window closed", after * 1e3));
        let _ = writeln!(
            out,
            "  scaled at {:>5.1}s: {} {} -> {} ({}{pushed})",
            action.at_s, action.service, action.from, action.to, action.reason
        );
    }
    let _ = writeln!(
        out,
        "  entry p95: before the fault {}, worst second after it {}, last 10 s {}; {}",
        opt_ms(s.latency_before_ms),
        opt_ms(s.latency_worst_ms),
        opt_ms(s.latency_after_ms),
        match s.recovered_after_s {
            Some(after) => format!("back under the SLO for {RECOVERED_FOR} s in a row {after} s after the fault"),
            None if timeline.detections.is_empty() => "no fault".to_string(),
            None => format!("never under the SLO for {RECOVERED_FOR} s in a row after the fault"),
        }
    );
    let _ = writeln!(
        out,
        "  SLO violated in {} s; {} replica-seconds; {} scaling actions, {} on services without a capacity or CPU fault",
        s.slo_violation_seconds, s.replica_seconds, s.scaling_actions, s.wrong_scalings
    );
    let finals: Vec<String> = s.final_replicas.iter().map(|(name, n)| format!("{name}={n}")).collect();
    let _ = writeln!(out, "  replicas at the end: {}", finals.join(" "));
    let _ = writeln!(out, "  requests: {} sent, {} ok, {} failed", s.sent, s.ok, s.failed);
    if s.failed_scalings > 0 {
        let _ = writeln!(
            out,
            "  NOT VALID: {} scalings could not be carried out on this machine (first: {}); the run measured the machine",
            s.failed_scalings,
            s.first_failed_scaling.as_deref().unwrap_or("?")
        );
    }
    out
}
