//! The local-mode benchmark: every shipped topology (or the ones named), a bottleneck in each of the positions its
//! `demo.faults` lists, under each policy — same topology, seed and load — and a table of SLO-violation seconds,
//! replica-seconds and scaling actions on services that were not the bottleneck.
//!
//! `cargo run --release -p rootscale-examples --bin compare -- [--topology shop]... [--duration 60s] [--seed 1]
//!  [--json FILE]`

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use rootscale_examples::local::{
    SHIPPED,
    policy::Policy,
    run::{ActionRecord, RunConfig, Summary, run},
    topology::Topology,
};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Compare rootscale with HPA on CPU and on latency, fault by fault, topology by topology")]
struct Args {
    /// Shipped topologies to run (shop, social, chain); all of them by default.
    #[arg(long)]
    topology: Vec<String>,
    /// Length of each run; the faults come at their topology's time (15s in the shipped ones).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write every run's summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    topology: String,
    fault: String,
    policy: String,
    detected_after_s: Option<f64>,
    summary: Summary,
    actions: Vec<ActionRecord>,
}

fn main() -> ExitCode {
    rootscale_examples::init_logging("warn");
    match compare(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn compare(args: Args) -> Result<(), String> {
    let mut topologies = Vec::new();
    for (name, text) in SHIPPED {
        if args.topology.is_empty() || args.topology.iter().any(|t| t == name) {
            topologies.push(Topology::parse(text, &format!("{name}.yaml")).map_err(|e| e.to_string())?);
        }
    }
    if topologies.is_empty() {
        return Err(format!("no shipped topology is called {:?} (shop, social, chain)", args.topology));
    }
    let mut rows = Vec::new();
    println!(
        "| topology | bottleneck | policy | SLO-violation s | replica-s | actions | wrong scalings | found after |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    for topology in &topologies {
        for fault in &topology.demo.faults {
            for policy in Policy::ALL {
                let mut config = RunConfig::new(topology.clone(), policy).map_err(|e| e.to_string())?;
                config.faults = vec![fault.clone()];
                config.duration = args.duration;
                config.seed = args.seed;
                eprintln!("running {} / {fault} / {policy} ...", topology.name);
                let timeline = run(&config, |_, _, _| {}).map_err(|e| e.to_string())?;
                let detected = timeline.detections.first().and_then(|d| d.detected_at_s.map(|at| at as f64 - d.at_s));
                let s = &timeline.summary;
                println!(
                    "| {} | {fault} | {policy} | {} | {} | {} | {} | {} |",
                    topology.name,
                    s.slo_violation_seconds,
                    s.replica_seconds,
                    s.scaling_actions,
                    s.wrong_scalings,
                    detected.map_or_else(|| "-".into(), |d| format!("{d:.0} s"))
                );
                rows.push(Row {
                    topology: topology.name.clone(),
                    fault: fault.to_string(),
                    policy: policy.to_string(),
                    detected_after_s: detected,
                    summary: timeline.summary,
                    actions: timeline.actions,
                });
            }
        }
    }
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
