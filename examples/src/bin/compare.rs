//! The local-mode benchmark: rootscale against the HPA baselines, scenario by scenario, topology by topology — the
//! same topology, seed and load for every policy — with SLO-violation seconds, replica-seconds, wrong scalings and
//! the time to recover.
//!
//! Without `--suite`, each shipped topology's `demo.faults`, one at a time, in a 60 s run. With `--suite`, every
//! kind of scenario on every shipped topology (see [`suite`]): the demo faults (capacity, CPU, the cascade through
//! worker pools, a slow link), a surge of load, and a fault that ends, in a 7-minute run, long enough to see the
//! scale-down back to the starting count; the first fault of each topology (its headline row) under `--seeds`
//! seeds.
//!
//! `cargo run --release -p rootscale-examples --bin compare -- [--suite] [--jobs 2] [--topology shop]...
//!  [--scenario payments]... [--kind cpu]... [--policy rootscale]... [--duration 60s] [--seed 1] [--seeds 1]
//!  [--window 1s] [--json FILE]` — the filters pick a subset, so one row can be reproduced in a minute.

use std::{
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
    process::ExitCode,
    sync::Mutex,
    time::Duration,
};

use clap::Parser;
use rootscale_examples::local::{
    SHIPPED,
    policy::Policy,
    run::{ActionRecord, RunConfig, Summary, run},
    scenario::{Fault, FaultKind, RateSchedule},
    topology::{ServiceSpec, Topology},
};
use rootscale_tracer::decide::PoolScope;
use serde::Serialize;

/// When the suite's faults and surges start.
const FAULT_AT: Duration = Duration::from_secs(15);
/// When the suite's fault that ends, ends.
const FAULT_UNTIL: Duration = Duration::from_secs(45);
/// The suite's run for a fault that ends: past HPA's 5-minute scale-down stabilisation after it, and after the
/// last step up `hpa-default` may take (its 15 s sync and 30 s average put it up to 35 s after the fault).
const LONG_RUN: Duration = Duration::from_secs(420);
/// A surge multiplies the topology's rate by this.
const SURGE: f64 = 2.0;

#[derive(Parser)]
#[command(about = "Compare rootscale with HPA baselines, scenario by scenario, topology by topology")]
struct Args {
    /// The whole benchmark suite: every kind of scenario on every (chosen) topology.
    #[arg(long)]
    suite: bool,
    /// Shipped topologies to run (shop, social, chain, threads); all of them by default.
    #[arg(long)]
    topology: Vec<String>,
    /// Length of each run (the suite's fault that ends runs 7 minutes whatever this says).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Scenarios to run: those whose name (as the table prints it) contains one of these; all by default.
    #[arg(long)]
    scenario: Vec<String>,
    /// Kinds of scenario to run (capacity, cpu, cascade, link, surge, ends); all by default.
    #[arg(long, value_enum)]
    kind: Vec<Kind>,
    /// Policies to run (rootscale, hpa-cpu, hpa-latency, hpa-default); all by default.
    #[arg(long)]
    policy: Vec<Policy>,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seeds per row (with --suite: per headline row; the others run the first seed only).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=20))]
    seeds: u64,
    /// Runs at once. Each run's replicas model their CPU with timers, so two at once on two cores still measure
    /// the model; more will start to measure the machine.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    jobs: u64,
    /// Write every run's summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The agents' window in every run (every policy's replicas run the same agents). Local mode's 1 s stands for
    /// a cluster's 5 s beside HPA's 15 s sync, shortened like the runs' 2 s sync.
    #[arg(long, default_value = "1s", value_parser = parse_window)]
    window: Duration,
}

/// Shortest and longest window a run takes: below 250 ms a window holds too few requests at the topologies'
/// rates for its percentiles; above the runs' 2 s sync the policy would ask about windows not yet closed.
const WINDOWS: std::ops::RangeInclusive<Duration> = Duration::from_millis(250)..=Duration::from_secs(2);

fn parse_window(text: &str) -> Result<Duration, String> {
    let window = humantime::parse_duration(text).map_err(|e| format!("`{text}`: {e}"))?;
    if !WINDOWS.contains(&window) {
        return Err(format!("`{text}`: a window must be between {:?} and {:?}", WINDOWS.start(), WINDOWS.end()));
    }
    Ok(window)
}

/// What a scenario tests, for the table and for what counts as a wrong scaling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Capacity,
    Cpu,
    /// A capacity or CPU fault under callers that hold a worker for the whole request.
    Cascade,
    Link,
    /// More load, no fault: scaling whatever saturates is right.
    Surge,
    /// A capacity or CPU fault that ends; the run lasts until the scale-down.
    Ends,
}

/// One row of the benchmark: what happens in the run, and how often it runs.
#[derive(Clone, Debug)]
struct Scenario {
    topology: Topology,
    name: String,
    kind: Kind,
    faults: Vec<Fault>,
    rate: RateSchedule,
    duration: Duration,
    seeds: u64,
}

#[derive(Serialize)]
struct Row {
    topology: String,
    scenario: String,
    kind: Kind,
    policy: String,
    seed: u64,
    /// The agents' window (`--window`).
    window_ms: u64,
    detected_after_s: Option<f64>,
    /// Seconds from the fault (or the surge) to the first scaling action.
    first_step_after_s: Option<f64>,
    /// Every service back at its starting count at the end.
    back_to_start: bool,
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

/// Whether `fault`'s service is called by a service that holds a worker for the whole request.
fn under_held_workers(topology: &Topology, fault: &Fault) -> bool {
    let held = |spec: &ServiceSpec| spec.pool == PoolScope::Request;
    topology.ancestors(&fault.service).iter().any(|caller| topology.spec(caller).is_some_and(held))
}

fn kind_of(topology: &Topology, fault: &Fault) -> Kind {
    match fault.kind {
        FaultKind::Link(_) => Kind::Link,
        _ if under_held_workers(topology, fault) => Kind::Cascade,
        FaultKind::Capacity(_) => Kind::Capacity,
        FaultKind::Cpu(_) => Kind::Cpu,
    }
}

/// The scenarios of `topology`: its demo faults one at a time (the first is the headline), and with `suite` a
/// surge and a fault that ends.
fn scenarios(topology: &Topology, args: &Args) -> Vec<Scenario> {
    let rate = topology.demo.rate;
    let one = |name: String, kind: Kind, faults: Vec<Fault>, rate: RateSchedule, duration: Duration, seeds: u64| {
        Scenario { topology: topology.clone(), name, kind, faults, rate, duration, seeds }
    };
    let mut all: Vec<Scenario> = topology
        .demo
        .faults
        .iter()
        .enumerate()
        .map(|(index, fault)| {
            let seeds = if !args.suite || index == 0 { args.seeds } else { 1 };
            let rate = RateSchedule::constant(rate);
            one(fault.to_string(), kind_of(topology, fault), vec![fault.clone()], rate, args.duration, seeds)
        })
        .collect();
    if args.suite {
        let surge = RateSchedule { steps: vec![(Duration::ZERO, rate), (FAULT_AT, rate * SURGE)] };
        let name = format!("load {rate}->{}@{}s", rate * SURGE, FAULT_AT.as_secs());
        all.push(one(name, Kind::Surge, Vec::new(), surge, args.duration, 1));
        if let Some(fault) = topology.demo.faults.iter().find(|f| !matches!(f.kind, FaultKind::Link(_))) {
            let ending = Fault { at: FAULT_AT, until: Some(FAULT_UNTIL), ..fault.clone() };
            let rate = RateSchedule::constant(rate);
            all.push(one(ending.to_string(), Kind::Ends, vec![ending], rate, LONG_RUN, 1));
        }
    }
    all.retain(|s| args.scenario.is_empty() || args.scenario.iter().any(|wanted| s.name.contains(wanted.as_str())));
    all.retain(|s| args.kind.is_empty() || args.kind.contains(&s.kind));
    all
}

/// One run to make.
struct Job {
    scenario: Scenario,
    policy: Policy,
    seed: u64,
    window: Duration,
}

fn run_one(job: &Job) -> Result<Row, String> {
    let scenario = &job.scenario;
    let mut config = RunConfig::new(scenario.topology.clone(), job.policy).map_err(|e| e.to_string())?;
    config.faults = scenario.faults.clone();
    config.rate = scenario.rate.clone();
    config.duration = scenario.duration;
    config.seed = job.seed;
    config.window = job.window;
    let timeline =
        run(&config, |_, _, _| {}).map_err(|e| format!("{} / {}: {e}", scenario.topology.name, scenario.name))?;
    let detected = timeline.detections.first().and_then(|d| d.detected_at_s.map(|at| at as f64 - d.at_s));
    let started = scenario.faults.first().map_or(FAULT_AT, |fault| fault.at).as_secs_f64();
    let first_step = timeline.actions.iter().map(|a| a.at_s - started).find(|after| *after >= 0.0);
    let back_to_start = timeline
        .summary
        .final_replicas
        .iter()
        .all(|(service, replicas)| scenario.topology.spec(service).is_some_and(|spec| spec.replicas == *replicas));
    Ok(Row {
        topology: scenario.topology.name.clone(),
        scenario: scenario.name.clone(),
        kind: scenario.kind,
        policy: job.policy.to_string(),
        seed: job.seed,
        window_ms: job.window.as_millis() as u64,
        detected_after_s: detected,
        first_step_after_s: first_step,
        back_to_start,
        summary: timeline.summary,
        actions: timeline.actions,
    })
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
    let policies: Vec<Policy> = if args.policy.is_empty() { Policy::ALL.to_vec() } else { args.policy.clone() };
    let mut jobs = VecDeque::new();
    for topology in &topologies {
        for scenario in scenarios(topology, &args) {
            for seed in args.seed..args.seed + scenario.seeds {
                for policy in &policies {
                    jobs.push_back(Job { scenario: scenario.clone(), policy: *policy, seed, window: args.window });
                }
            }
        }
    }
    if jobs.is_empty() {
        return Err(format!("no scenario matches {:?}", args.scenario));
    }
    let total = jobs.len();
    let queue = Mutex::new(jobs);
    let rows: Mutex<Vec<Row>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..args.jobs {
            scope.spawn(|| {
                loop {
                    let Some(job) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else { return };
                    eprintln!(
                        "running {} / {} / {} / seed {} ...",
                        job.scenario.topology.name, job.scenario.name, job.policy, job.seed
                    );
                    match run_one(&job) {
                        Ok(row) => {
                            let mut rows = rows.lock().unwrap_or_else(|p| p.into_inner());
                            rows.push(row);
                            eprintln!("done {} of {total}", rows.len());
                        }
                        Err(error) => {
                            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
                            queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(error) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(error);
    }
    let rows = rows.into_inner().unwrap_or_else(|p| p.into_inner());
    print!("{}", table(&rows, &topologies, &policies));
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // A run whose scalings this machine could not carry out measured the machine: say so, and fail.
    let invalid: Vec<String> = rows
        .iter()
        .filter(|row| row.summary.failed_scalings > 0)
        .map(|row| {
            format!(
                "{} / {} / {} / seed {}: {} scalings could not be carried out (first: {})",
                row.topology,
                row.scenario,
                row.policy,
                row.seed,
                row.summary.failed_scalings,
                row.summary.first_failed_scaling.as_deref().unwrap_or("?")
            )
        })
        .collect();
    if !invalid.is_empty() {
        return Err(format!(
            "{} runs are not valid, their rows measure this machine:\n{}",
            invalid.len(),
            invalid.join("\n")
        ));
    }
    Ok(())
}

/// `mean` of the values, with their range when they differ.
fn spread(values: &[f64]) -> String {
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let (min, max) = values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    if values.len() > 1 && max > min { format!("{mean:.0} ({min:.0}–{max:.0})") } else { format!("{mean:.0}") }
}

/// The rows, seeds averaged, in the order the scenarios were listed; then the totals per policy over every row.
fn table(rows: &[Row], topologies: &[Topology], policies: &[Policy]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| topology | scenario | kind | policy | runs | SLO-violation s | replica-s | wrong scalings | time to recover | found after | first step after | back to start |"
    );
    let _ = writeln!(out, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
    // Totals per policy: the per-row means, summed.
    let mut totals: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
    let mut order: Vec<(&str, &str)> = Vec::new();
    for topology in topologies {
        for row in rows.iter().filter(|r| r.topology == topology.name) {
            if !order.contains(&(row.topology.as_str(), row.scenario.as_str())) {
                order.push((row.topology.as_str(), row.scenario.as_str()));
            }
        }
    }
    for (topology, scenario) in order {
        for policy in policies {
            let runs: Vec<&Row> = rows
                .iter()
                .filter(|r| r.topology == topology && r.scenario == scenario && r.policy == policy.as_str())
                .collect();
            let Some(first) = runs.first() else { continue };
            let values = |f: &dyn Fn(&Row) -> f64| runs.iter().map(|r| f(r)).collect::<Vec<f64>>();
            let violation = values(&|r| r.summary.slo_violation_seconds as f64);
            let replicas = values(&|r| r.summary.replica_seconds as f64);
            let wrong = values(&|r| r.summary.wrong_scalings as f64);
            let recovered: Vec<Option<u64>> = runs.iter().map(|r| r.summary.recovered_after_s).collect();
            let recover = if recovered.iter().all(Option::is_some) {
                format!("{} s", spread(&recovered.iter().flatten().map(|s| *s as f64).collect::<Vec<_>>()))
            } else {
                format!("never in {} of {}", recovered.iter().filter(|r| r.is_none()).count(), runs.len())
            };
            let found: Vec<f64> = runs.iter().filter_map(|r| r.detected_after_s).collect();
            let found = if first.kind == Kind::Surge {
                "-".to_string()
            } else if found.len() == runs.len() {
                format!("{} s", spread(&found))
            } else {
                format!("not in {} of {}", runs.len() - found.len(), runs.len())
            };
            let back = runs.iter().filter(|r| r.back_to_start).count();
            let steps: Vec<f64> = runs.iter().filter_map(|r| r.first_step_after_s).collect();
            let step = if steps.is_empty() {
                "none".to_string()
            } else if steps.len() == runs.len() {
                format!("{} s", spread(&steps))
            } else {
                format!("{} s ({} of {})", spread(&steps), steps.len(), runs.len())
            };
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
            let entry = totals.entry(policy.to_string()).or_default();
            entry.0 += mean(&violation);
            entry.1 += mean(&replicas);
            // A surge has no fault: whatever saturates is right to scale.
            let wrong_text = if first.kind == Kind::Surge {
                "-".to_string()
            } else {
                entry.2 += mean(&wrong);
                spread(&wrong)
            };
            let _ = writeln!(
                out,
                "| {topology} | {scenario} | {:?} | {policy} | {} | {} | {} | {wrong_text} | {recover} | {found} | {step} | {back} of {} |",
                first.kind,
                runs.len(),
                spread(&violation),
                spread(&replicas),
                runs.len()
            );
        }
    }
    let _ = writeln!(out, "\n| policy | SLO-violation s | replica-s | wrong scalings |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for policy in policies {
        if let Some((violation, replicas, wrong)) = totals.get(policy.as_str()) {
            let _ = writeln!(out, "| {policy} | {violation:.0} | {replicas:.0} | {wrong:.0} |");
        }
    }
    out
}
