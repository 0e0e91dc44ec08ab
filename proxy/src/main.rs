//! `rootscale-proxy`: the sidecar.
//!
//! - `rootscale-proxy [run]` hosts this service's agent (the `ROOTSCALE_*` settings of a linked service) and serves
//!   the inbound and outbound ports (`ROOTSCALE_PROXY_*`, see the `config` module) until SIGTERM or Ctrl-C.
//! - `rootscale-proxy inject [options] < manifest.yaml > injected.yaml` adds the sidecar to a manifest's workloads.

use std::{io::Read, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use rootscale_proxy::{Proxy, ProxyConfig, ProxyCounters, inject};
use rootscale_tracer::{Agent, Tracer, measure::headers::valid_service_name};

#[derive(Parser)]
#[command(about = "rootscale's sidecar for services that cannot link rootscale-tracer")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: host the agent, forward inbound and outbound traffic (the default).
    Run,
    /// Add the sidecar to the workloads of a Kubernetes manifest read from standard input.
    Inject {
        /// The proxy's image.
        #[arg(long, default_value = inject::DEFAULT_IMAGE)]
        image: String,
        /// The application container (default: the first).
        #[arg(long)]
        container: Option<String>,
        /// The port the application listens on (default: its container's first port).
        #[arg(long)]
        app_port: Option<u16>,
        /// A callee by name, `name=host:port` (repeatable): ROOTSCALE_PROXY_ROUTES for the sidecar.
        #[arg(long = "route")]
        routes: Vec<String>,
        /// The Secret with the mesh key (key `mesh-key`), mounted into the sidecar.
        #[arg(long)]
        mesh_key_secret: Option<String>,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let outcome = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run().await.map_err(|error| error.to_string()),
        Command::Inject { image, container, app_port, routes, mesh_key_secret } => {
            let routes = (!routes.is_empty()).then(|| routes.join(","));
            inject_stdin(&inject::Options { image, container, app_port, routes, mesh_key_secret })
        }
    };
    if let Err(error) = outcome {
        eprintln!("rootscale-proxy: {error}");
        std::process::exit(2);
    }
}

fn inject_stdin(options: &inject::Options) -> Result<(), String> {
    let mut manifest = String::new();
    std::io::stdin()
        .take(inject::MAX_INPUT_BYTES as u64 + 1)
        .read_to_string(&mut manifest)
        .map_err(|error| format!("reading the manifest: {error}"))?;
    let injected = inject::inject(&manifest, options)?;
    for warning in &injected.warnings {
        eprintln!("rootscale-proxy inject: warning: {warning}");
    }
    print!("{}", injected.manifest);
    Ok(())
}

async fn run() -> Result<(), rootscale_proxy::Error> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let config = ProxyConfig::from_env()?;
    let counters = Arc::new(ProxyCounters::default());
    let agent = match Agent::from_env() {
        Ok(builder) => builder.extra_metrics(counters.clone()).start().await,
        Err(error) => Err(error),
    };
    // The application's traffic does not depend on rootscale: an agent that cannot start (a bad setting, its port
    // taken, an unreadable key) leaves the proxy forwarding, measured by a tracer nobody reads.
    let (agent, tracer) = match agent {
        Ok(agent) => {
            let tracer = agent.tracer().clone();
            (Some(agent), tracer)
        }
        Err(error) => {
            tracing::error!(%error, "the agent could not start: forwarding the application's traffic unmeasured");
            let service = std::env::var("ROOTSCALE_SERVICE").ok().filter(|name| valid_service_name(name));
            let tracer = Tracer::builder(service.unwrap_or_else(|| "unknown".to_string())).build()?;
            (None, tracer)
        }
    };
    let proxy = Proxy::start_counting(&config, &tracer, counters).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|error| rootscale_proxy::Error::Config(format!("cannot watch for SIGTERM: {error}")))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    proxy.stop();
    if let Some(agent) = agent {
        agent.shutdown(Duration::from_secs(1)).await;
    }
    Ok(())
}
