//! The local-mode benchmark: every shipped topology (or the ones named), a bottleneck in each of the positions its
//! `demo.faults` lists, under each policy — same topology, seed and load — and a table of SLO-violation seconds,
//! replica-seconds and scaling actions on services that were not the bottleneck.
//!
//! `cargo run --release -p rootscale-examples --bin compare -- [--topology shop]... [--scenario payments]...
//!  [--policy rootscale]... [--duration 60s] [--seed 1] [--seeds 1] [--json FILE]` — the filters pick a subset, so
//! one row can be reproduced in a minute.

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
    /// Shipped topologies to run (shop, social, chain, threads); all of them by default.
    #[arg(long)]
    topology: Vec<String>,
    /// Length of each run; the faults come at their topology's time (15s in the shipped ones).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Faults to run: those whose text (as the table prints it) contains one of these; all by default.
    #[arg(long)]
    scenario: Vec<String>,
    /// Policies to run (rootscale, hpa-cpu, hpa-latency, hpa-default); all by default.
    #[arg(long)]
    policy: Vec<Policy>,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seeds per row, from `--seed` on.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=20))]
    seeds: u64,
    /// Write every run's summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    topology: String,
    fault: String,
    policy: String,
    seed: u64,
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
        return Err(format!("no shipped topology is called {:?} (shop, social, chain, threads)", args.topology));
    }
    let mut rows = Vec::new();
    let policies: Vec<Policy> = if args.policy.is_empty() { Policy::ALL.to_vec() } else { args.policy.clone() };
    println!(
        "| topology | bottleneck | policy | seed | SLO-violation s | replica-s | actions | wrong scalings | found after |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|");
    let mut ran = 0;
    for topology in &topologies {
        let faults = topology.demo.faults.iter().filter(|fault| {
            let text = fault.to_string();
            args.scenario.is_empty() || args.scenario.iter().any(|wanted| text.contains(wanted.as_str()))
        });
        for fault in faults {
            for (policy, seed) in
                policies.iter().flat_map(|p| (args.seed..args.seed + args.seeds).map(move |s| (*p, s)))
            {
                ran += 1;
                let mut config = RunConfig::new(topology.clone(), policy).map_err(|e| e.to_string())?;
                config.faults = vec![fault.clone()];
                config.duration = args.duration;
                config.seed = seed;
                eprintln!("running {} / {fault} / {policy} / seed {seed} ...", topology.name);
                let timeline = run(&config, |_, _, _| {}).map_err(|e| e.to_string())?;
                let detected = timeline.detections.first().and_then(|d| d.detected_at_s.map(|at| at as f64 - d.at_s));
                let s = &timeline.summary;
                println!(
                    "| {} | {fault} | {policy} | {seed} | {} | {} | {} | {} | {} |",
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
                    seed,
                    detected_after_s: detected,
                    summary: timeline.summary,
                    actions: timeline.actions,
                });
            }
        }
    }
    if ran == 0 {
        return Err(format!("no fault matches {:?}", args.scenario));
    }
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
