//! The local demo: a topology of real services on loopback, open-loop load, a bottleneck injected, and a policy
//! scaling the services' replicas — by default rootscale, asking each replica's agent.
//!
//! `cargo run --release -p rootscale-examples --bin demo -- [--topology shop|social|chain|FILE]
//!  [--policy rootscale|hpa-cpu|hpa-latency|hpa-default] [--inject SERVICE=KIND:VALUE@TIME]... [--no-fault]
//!  [--rate 150|100,300@20s] [--duration 60s] [--seed 1] [--json FILE] [--plain]`

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use rootscale_dashboard as dashboard;
use rootscale_examples::local::{
    SHIPPED,
    live::Live,
    policy::{Action, Policy},
    replica::CpuModel,
    report,
    run::{RunConfig, run},
    scenario::{Fault, RateSchedule},
    topology::Topology,
};
use rootscale_tracer::decide::AggregationMode;

#[derive(Parser)]
#[command(about = "Run rootscale's whole loop on this machine: real services, load, a bottleneck, scaling")]
struct Args {
    /// A topology file, or the name of a shipped one (shop, social, chain, threads).
    #[arg(long, default_value = "shop")]
    topology: String,
    /// Who scales: rootscale's agents, or HPA on CPU or on each service's latency.
    #[arg(long, default_value = "rootscale")]
    policy: Policy,
    /// A fault, SERVICE=KIND:VALUE@TIME with KIND capacity (pool / VALUE), cpu (CPU time × VALUE) or link (VALUE
    /// added to every call into SERVICE). Repeatable. Default: the topology's first demo fault.
    #[arg(long = "inject", value_name = "FAULT")]
    faults: Vec<Fault>,
    /// Inject nothing (a healthy run).
    #[arg(long, conflicts_with = "faults")]
    no_fault: bool,
    /// Requests per second: a number, or a schedule like 100,300@20s,100@40s. Default: the topology's.
    #[arg(long)]
    rate: Option<RateSchedule>,
    /// How long the load runs. Default: the topology's (60s for the shipped ones).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Seeds arrivals, service times and call choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The agents' window.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// How often the policy decides (HPA's sync period; 15s in Kubernetes, shortened for a one-minute run).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    sync: Duration,
    /// The agents' aggregation mode: max (follow the largest wait) or sum (act on every large wait).
    #[arg(long, default_value = "max", value_parser = ["max", "sum"])]
    mode: String,
    /// hpa-cpu's target utilisation.
    #[arg(long, default_value_t = 0.6)]
    cpu_target: f64,
    /// Write the whole timeline (every second, every action, the summary) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// One line per second instead of a redrawn table.
    #[arg(long)]
    plain: bool,
    /// Burn each request's CPU time on its replica's thread instead of modelling it (for overhead experiments:
    /// replicas then share this machine's real cores, so on a small machine they add little capacity).
    #[arg(long)]
    burn_cpu: bool,
    /// Where the dashboard listens (read-only; loopback unless you say otherwise). Port 0 picks a free one.
    #[arg(long, default_value = DEFAULT_DASHBOARD)]
    dashboard: SocketAddr,
    /// No dashboard.
    #[arg(long, conflicts_with = "keep_serving")]
    no_dashboard: bool,
    /// Keep serving the dashboard after the run, until Ctrl-C.
    #[arg(long)]
    keep_serving: bool,
}

const DEFAULT_DASHBOARD: &str = "127.0.0.1:7878";

fn topology(name_or_path: &str) -> Result<Topology, String> {
    let path = PathBuf::from(name_or_path);
    if !path.exists()
        && let Some((name, text)) = SHIPPED.iter().find(|(name, _)| *name == name_or_path)
    {
        return Topology::parse(text, &format!("{name}.yaml (shipped)")).map_err(|e| e.to_string());
    }
    Topology::load(&path).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    rootscale_examples::init_logging("warn");
    let args = Args::parse();
    match demo(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn demo(args: Args) -> Result<(), String> {
    let topology = topology(&args.topology)?;
    let mut config = RunConfig::new(topology, args.policy).map_err(|e| e.to_string())?;
    if let Some(rate) = args.rate {
        config.rate = rate;
    }
    if let Some(duration) = args.duration {
        config.duration = duration;
    }
    if args.no_fault {
        config.faults.clear();
    } else if !args.faults.is_empty() {
        config.faults = args.faults;
    }
    if !(args.cpu_target > 0.0 && args.cpu_target <= 1.0) {
        return Err(format!("--cpu-target {} is not in (0, 1]", args.cpu_target));
    }
    config.seed = args.seed;
    config.window = args.window;
    config.sync = args.sync;
    config.cpu_target = args.cpu_target;
    config.cpu_model = if args.burn_cpu { CpuModel::Burn } else { CpuModel::Virtual };
    config.mode = if args.mode == "sum" { AggregationMode::Sum } else { AggregationMode::Max };
    config.check().map_err(|e| e.to_string())?;
    let redraw = std::io::stdout().is_terminal() && !args.plain;
    let mut recent: Vec<Action> = Vec::new();
    println!(
        "Starting {} ({} services) under {}; load {} for {}; faults: {}",
        config.topology.name,
        config.topology.services.len(),
        config.policy,
        config
            .rate
            .steps
            .iter()
            .map(|(at, rate)| format!("{rate} rps from {}s", at.as_secs()))
            .collect::<Vec<_>>()
            .join(", "),
        humantime::format_duration(config.duration),
        if config.faults.is_empty() {
            "none".to_string()
        } else {
            config.faults.iter().map(Fault::to_string).collect::<Vec<_>>().join(", ")
        }
    );
    // The dashboard runs on a small runtime of its own for as long as the command does.
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("dashboard")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut live = (!args.no_dashboard).then(|| Live::new(&config.topology, &config.faults));
    let mut footer = String::new();
    if let Some(live) = &live {
        let serve =
            |addr| server.block_on(dashboard::server::serve(live.dashboard.clone(), addr, std::future::pending()));
        let bound = match serve(args.dashboard) {
            Ok(bound) => bound,
            // The default port is taken (another demo?): any free one will do.
            Err(_) if args.dashboard.to_string() == DEFAULT_DASHBOARD => {
                serve(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(|e| format!("dashboard: {e}"))?
            }
            Err(error) => return Err(format!("dashboard on {}: {error}", args.dashboard)),
        };
        println!("Dashboard: http://{bound}/");
        footer = format!("\ndashboard: http://{bound}/\n");
    }
    let timeline = run(&config, |tick, actions, detections| {
        if let Some(live) = live.as_mut() {
            live.on_tick(tick, actions, detections);
        }
        recent.extend(actions.iter().cloned());
        let keep = recent.len().saturating_sub(6);
        recent.drain(..keep);
        if redraw {
            print!("\x1b[H\x1b[2J{}{footer}", report::table(&config, tick, &recent, detections));
        } else {
            println!("{}", report::line(tick, actions));
        }
    })
    .map_err(|e| e.to_string())?;
    print!("{}", report::summary(&timeline));
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&timeline).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("timeline written to {}", path.display());
    }
    if args.keep_serving && live.is_some() {
        println!("The dashboard stays up; Ctrl-C to stop.");
        loop {
            std::thread::park();
        }
    }
    Ok(())
}
