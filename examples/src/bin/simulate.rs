//! The simulator: every service of generated call graphs of 100, 1,000 and 10,000 services runs the agent's own
//! decision loop over modelled windows, with reports delayed, lost and skewed (see
//! `rootscale_examples::simulate`). Prints, per graph size, mode and loss: precision and recall of the root
//! causes, windows to detect (median, p99), reports and bytes per agent per window, decision time per agent per
//! window (median, p99), and the wall time of the run.
//!
//! `cargo run --release -p rootscale-examples --bin simulate -- [--sizes 100,1000,10000] [--loss 0,0.01,0.1]
//! [--modes max,sum] [--windows 60] [--seed 1]`

use std::time::Duration;

use clap::Parser;
use rootscale_examples::simulate::run::{SimConfig, SimOutcome, run};
use rootscale_tracer::decide::AggregationMode;

#[derive(Parser)]
struct Args {
    /// Graph sizes (services), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000",
          value_parser = clap::value_parser!(usize))]
    sizes: Vec<usize>,
    /// Shares of reports lost, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,0.01,0.1")]
    loss: Vec<f64>,
    /// Aggregation modes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "max,sum")]
    modes: Vec<AggregationMode>,
    /// Windows per run (1 s each).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(20..=1000))]
    windows: u64,
    /// The graph's seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() {
    let args = Args::parse();
    if let Some(size) = args.sizes.iter().find(|size| !(2..=20_000).contains(*size)) {
        eprintln!("--sizes: {size} is outside 2..=20000");
        std::process::exit(2);
    }
    if let Some(loss) = args.loss.iter().find(|loss| !(0.0..=0.5).contains(*loss)) {
        eprintln!("--loss: {loss} is outside 0..=0.5");
        std::process::exit(2);
    }
    println!(
        "| services | mode | loss | faults | violated | precision | recall | windows to detect (median / p99) | \
         reports / agent / window | bytes / agent / window (mean / max) | decision time / agent / window (median / \
         p99) | wall time |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---|---:|---|---|---:|");
    let mut traffic = Vec::new();
    for &size in &args.sizes {
        for &mode in &args.modes {
            for &loss in &args.loss {
                let config = SimConfig { mode, loss, windows: args.windows, ..SimConfig::new(size, args.seed) };
                let outcome = run(&config);
                print_row(size, mode, loss, &outcome);
                if traffic.len() < args.sizes.len() && traffic.iter().all(|(s, _, _)| *s != size) {
                    let windows = outcome.bytes_per_agent_window.len() as f64 / size as f64;
                    let bytes_per_second = outcome.bytes_per_agent_window.iter().sum::<f64>()
                        / windows
                        / (config.window_ms as f64 / 1000.0);
                    traffic.push((size, outcome.spans_per_second, bytes_per_second));
                }
                for fault in outcome.faults.iter().filter(|f| !f.violated) {
                    eprintln!(
                        "  {:?} at {:?}: broke no SLO (the entries' p95 peaked at {:.0} % of their SLOs)",
                        fault.kind,
                        fault.truth,
                        fault.peak_slo_ratio * 100.0
                    );
                }
                for fault in outcome.faults.iter().filter(|f| f.violated && (f.detected_in.is_none() || f.wrong > 0)) {
                    eprintln!(
                        "  {:?} at {:?}: detected in {:?}, {} right and {} wrong verdicts",
                        fault.kind, fault.truth, fault.detected_in, fault.right, fault.wrong
                    );
                    for example in &fault.wrong_examples {
                        eprintln!("    {example}");
                    }
                }
            }
        }
    }
    print_traffic(&traffic);
}

/// Bytes of one span as a collector receives it (OTLP/protobuf with a handful of attributes): an assumption.
const SPAN_BYTES: f64 = 500.0;

fn print_traffic(traffic: &[(usize, f64, f64)]) {
    println!();
    println!(
        "| services | spans / s a central collector ingests | its bytes / s at {SPAN_BYTES:.0} B a span | rootscale's reports, \
         all agents, bytes / s | ratio |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for (size, spans, reports) in traffic {
        let collector = spans * SPAN_BYTES;
        println!("| {size} | {spans:.0} | {collector:.0} | {reports:.0} | {:.0}× |", collector / reports.max(1.0));
    }
}

fn print_row(size: usize, mode: AggregationMode, loss: f64, outcome: &SimOutcome) {
    let asked: Vec<_> = outcome.faults.iter().filter(|f| f.violated).collect();
    let detected: Vec<u64> = asked.iter().filter_map(|f| f.detected_in).collect();
    let (right, wrong) = outcome.faults.iter().fold((0, 0), |(r, w), f| (r + f.right, w + f.wrong));
    let precision = right as f64 / (right + wrong).max(1) as f64;
    let recall = detected.len() as f64 / asked.len().max(1) as f64;
    let mut windows = detected.clone();
    windows.sort_unstable();
    let mut cpu = outcome.cpu_per_agent_window.clone();
    cpu.sort_unstable();
    let bytes = &outcome.bytes_per_agent_window;
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len().max(1) as f64;
    println!(
        "| {size} | {} | {:.0}% | {} | {} | {:.1}% | {:.1}% | {} / {} | {:.1} | {:.0} B / {:.0} B | {} / {} | {:.1} s |",
        match mode {
            AggregationMode::Max => "max",
            AggregationMode::Sum => "sum",
        },
        loss * 100.0,
        outcome.faults.len(),
        asked.len(),
        precision * 100.0,
        recall * 100.0,
        quantile(&windows, 0.5).map_or("-".into(), |w| w.to_string()),
        quantile(&windows, 0.99).map_or("-".into(), |w| w.to_string()),
        mean(&outcome.reports_per_agent_window),
        mean(bytes),
        bytes.iter().copied().fold(0.0, f64::max),
        micros(quantile(&cpu, 0.5)),
        micros(quantile(&cpu, 0.99)),
        outcome.elapsed.as_secs_f64(),
    );
}

fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * q).round() as usize])
}

fn micros(value: Option<Duration>) -> String {
    value.map_or("-".into(), |d| format!("{:.0} µs", d.as_secs_f64() * 1e6))
}
