//! The localization benchmark: runs the scenario matrix of the agent's tests (the faults of the topology files in
//! `examples/topologies/matrix/`: every service of a chain of 4, a diamond and a fan-out with a worker pool too
//! small for the load and with a CPU-bound handler, and slowed links), repeated, and prints precision@1, recall,
//! windows-to-detect and bytes exchanged per edge per window.
//!
//! `cargo run --release -p rootscale-examples --bin localize -- [--repeat 2] [--window-ms 1000] [--rate 150]
//! [--sample 1/16] [--topology diamond] [--kind capacity]`

use std::time::Duration;

use clap::Parser;
use rootscale_examples::{
    local::scenario::FaultKind,
    localization::{MATRIX, Settings, faulty_link, matrix_topology, run_scenario},
};
use rootscale_tracer::SampleRate;

#[derive(Parser)]
struct Args {
    /// Times each scenario runs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=50))]
    repeat: u32,
    /// Window length in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    window_ms: u64,
    /// Requests per second at the entry.
    #[arg(long, default_value_t = 150.0)]
    rate: f64,
    /// Windows to wait for a detection before counting a miss.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    max_windows: u32,
    /// Every replica measures one request in N (`1/16`), as with `ROOTSCALE_SAMPLE`.
    #[arg(long, default_value = "1")]
    sample: SampleRate,
    /// Only this matrix topology; all of them when not given.
    #[arg(long, value_parser = ["chain-4", "diamond", "fan-out"])]
    topology: Option<String>,
    /// Only faults of this kind; all of them when not given.
    #[arg(long, value_parser = ["capacity", "cpu", "link"])]
    kind: Option<String>,
}

#[derive(Default)]
struct Tally {
    scenarios: u32,
    detected: u32,
    /// Scenarios where some service said root-cause (or, for links, network) in the window checked.
    answered: u32,
    /// …and the only one was right.
    right_first: u32,
    windows: Vec<u32>,
}

impl Tally {
    fn line(&self, label: &str) -> String {
        let mut windows = self.windows.clone();
        windows.sort_unstable();
        let median = windows.get(windows.len() / 2).map_or("-".to_string(), |w| w.to_string());
        let max = windows.last().map_or("-".to_string(), |w| w.to_string());
        let precision =
            if self.answered == 0 { 0.0 } else { 100.0 * f64::from(self.right_first) / f64::from(self.answered) };
        format!(
            "{label:<22} {:>9} {:>12.1}% {:>8.1}% {:>16} {:>13}",
            self.scenarios,
            precision,
            100.0 * f64::from(self.detected) / f64::from(self.scenarios.max(1)),
            median,
            max
        )
    }

    fn add(&mut self, other: &Tally) {
        self.scenarios += other.scenarios;
        self.detected += other.detected;
        self.answered += other.answered;
        self.right_first += other.right_first;
        self.windows.extend(&other.windows);
    }
}

fn main() {
    rootscale_examples::init_logging("warn");
    let args = Args::parse();
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 5000.0) {
        eprintln!("--rate takes requests per second in (0, 5000]");
        std::process::exit(2);
    }
    let settings = match Settings::new() {
        Ok(settings) => Settings {
            window: Duration::from_millis(args.window_ms),
            rate: Some(args.rate),
            sample: args.sample,
            ..settings
        },
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(1);
        }
    };
    println!(
        "localization matrix: {} repeats, {} ms windows, {} req/s, detection counted within {} windows, {} of \
         requests measured",
        args.repeat, args.window_ms, args.rate, args.max_windows, args.sample
    );
    let mut rows: Vec<(String, Tally)> = Vec::new();
    let mut bytes = Vec::new();
    for (name, _) in MATRIX.iter().filter(|(name, _)| args.topology.as_ref().is_none_or(|wanted| wanted == name)) {
        let topology = match matrix_topology(name) {
            Ok(topology) => topology,
            Err(error) => {
                eprintln!("{error}");
                std::process::exit(1);
            }
        };
        for kind in
            ["capacity", "cpu", "link"].into_iter().filter(|k| args.kind.as_deref().is_none_or(|wanted| wanted == *k))
        {
            let mut tally = Tally::default();
            for fault in topology.demo.faults.iter().filter(|f| f.kind_name() == kind) {
                for _ in 0..args.repeat {
                    let result = match run_scenario(&topology, &settings, fault, args.max_windows) {
                        Ok(result) => result,
                        Err(error) => {
                            eprintln!("{name} {fault}: could not run: {error}");
                            continue;
                        }
                    };
                    tally.scenarios += 1;
                    bytes.push(result.bytes_per_report);
                    if let Some(windows) = result.detected_in {
                        tally.detected += 1;
                        tally.windows.push(windows);
                        if windows > 1 {
                            eprintln!("{name} {fault}: late: {}", result.misses.join("; "));
                        }
                    } else {
                        eprintln!("{name} {fault}: missed: {}", result.misses.join("; "));
                    }
                    // What the system pointed at: root causes, or for a link the caller's network verdict.
                    let (culprit, named): (String, Vec<&String>) = match fault.kind {
                        FaultKind::Link(_) => (
                            faulty_link(&topology, fault).map(|(from, _)| from).unwrap_or_default(),
                            result
                                .last_verdicts
                                .iter()
                                .filter(|(_, seen)| {
                                    seen.link.is_some() && seen.verdict == rootscale_proto::v1::Verdict::Network
                                })
                                .map(|(name, _)| name)
                                .chain(result.root_causes.iter())
                                .collect(),
                        ),
                        _ => (fault.service.clone(), result.root_causes.iter().collect()),
                    };
                    if !named.is_empty() {
                        tally.answered += 1;
                        if named.len() == 1 && *named[0] == culprit {
                            tally.right_first += 1;
                        }
                    }
                }
            }
            rows.push((format!("{name} / {kind}"), tally));
        }
    }
    println!();
    println!(
        "{:<22} {:>9} {:>13} {:>9} {:>16} {:>13}",
        "scenario", "runs", "precision@1", "recall", "windows (median)", "windows (max)"
    );
    let mut all = Tally::default();
    for (label, tally) in &rows {
        println!("{}", tally.line(label));
        all.add(tally);
    }
    println!("{}", all.line("all"));
    bytes.sort_by(f64::total_cmp);
    let mean = bytes.iter().sum::<f64>() / bytes.len().max(1) as f64;
    println!();
    println!(
        "report size: mean {mean:.0} B (largest run mean {:.0} B); per edge per window, one report each way: {:.0} B",
        bytes.last().copied().unwrap_or(0.0),
        2.0 * mean
    );
}
