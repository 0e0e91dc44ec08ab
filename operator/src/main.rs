//! `rootscale-operator run` runs the operator; `crd` prints the ScalingDecision CRD; `api-calls` lists the API
//! calls it makes (what RBAC must grant).

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};
use rootscale_operator::{
    controller::reconcile::OperatorConfig,
    run::{RunConfig, run},
};

#[derive(Parser)]
#[command(name = "rootscale-operator", version, about = "rootscale's Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(RunArgs),
    /// Print the ScalingDecision CustomResourceDefinition as YAML.
    Crd,
    /// Print the Kubernetes API calls the operator makes, one "group resource verb" a line (what RBAC must grant).
    ApiCalls,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Namespaces to watch, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', env = "ROOTSCALE_NAMESPACES")]
    namespaces: Vec<String>,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, default_value = "0.0.0.0:8080", env = "ROOTSCALE_HTTP_ADDR")]
    http_addr: SocketAddr,
    /// How often each managed Deployment is reconciled.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    resync: Duration,
    /// How long an agent may take to answer.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    agent_timeout: Duration,
    /// A file holding the agents' shared token.
    #[arg(long, env = "ROOTSCALE_AGENT_TOKEN_FILE")]
    agent_token_file: Option<std::path::PathBuf>,
    /// The namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This instance's identity in the Lease (its pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Act without a Lease (only for a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// Where the read-only dashboard listens. Loopback by default: reach it with `kubectl port-forward`.
    #[arg(long, default_value = "127.0.0.1:8090", env = "ROOTSCALE_DASHBOARD_ADDR")]
    dashboard_addr: SocketAddr,
    /// No dashboard.
    #[arg(long)]
    no_dashboard: bool,
}

fn check(args: &RunArgs) -> Result<(), String> {
    if args.resync < Duration::from_secs(1) || args.resync > Duration::from_secs(3600) {
        return Err(format!("--resync {:?} must be between 1s and 1h", args.resync));
    }
    if args.agent_timeout.is_zero() || args.agent_timeout > args.resync {
        return Err(format!("--agent-timeout {:?} must be above zero and at most --resync", args.agent_timeout));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .json()
        .init();
    let args = match Cli::parse().command {
        Command::Crd => {
            return match rootscale_operator::crd::yaml() {
                Ok(text) => {
                    print!("{text}");
                    std::process::ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("cannot render the CRD: {error}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::ApiCalls => {
            for (group, resource, verb, _) in rootscale_operator::rbac::API_CALLS {
                println!("{group} {resource} {verb}");
            }
            return std::process::ExitCode::SUCCESS;
        }
        Command::Run(args) => args,
    };
    if let Err(error) = check(&args) {
        eprintln!("{error}");
        return std::process::ExitCode::from(2);
    }
    let agent_token = match &args.agent_token_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(token) => Some(token.trim().to_string()),
            Err(error) => {
                eprintln!("cannot read --agent-token-file {}: {error}", path.display());
                return std::process::ExitCode::from(2);
            }
        },
    };
    let leader_election = if args.no_leader_election {
        None
    } else {
        let identity = args.identity.clone().unwrap_or_else(|| format!("rootscale-operator-{}", std::process::id()));
        Some((args.lease_namespace.clone(), identity))
    };
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("cannot reach the Kubernetes API: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let config = RunConfig {
        namespaces: args.namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
        http_addr: args.http_addr,
        operator: OperatorConfig { resync: args.resync, agent_timeout: args.agent_timeout, agent_token },
        leader_election,
        dashboard_addr: (!args.no_dashboard).then_some(args.dashboard_addr),
    };
    match run(client, config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error}");
            std::process::ExitCode::FAILURE
        }
    }
}
