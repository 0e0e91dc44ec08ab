//! `rootscale-operator run` runs the operator; `crd` prints the ScalingDecision CRD; `api-calls` lists the API
//! calls it makes (what RBAC must grant).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use rootscale_operator::{
    agents::AgentClient,
    controller::reconcile::OperatorConfig,
    run::{RunConfig, run},
    tls::{AgentTls, AgentTlsFiles},
};
use rootscale_tracer::identity::KeyRing;

#[derive(Parser)]
#[command(name = "rootscale-operator", version, about = "rootscale's Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(Box<RunArgs>),
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
    /// Deployments reconciled at once (1–1024).
    #[arg(long, default_value_t = rootscale_operator::controller::reconcile::DEFAULT_CONCURRENCY)]
    concurrency: u16,
    /// A file holding the agents' shared token.
    #[arg(long, env = "ROOTSCALE_AGENT_TOKEN_FILE")]
    agent_token_file: Option<PathBuf>,
    /// PEM file: the CA that signed the agents' certificates. Given, the agents are called over TLS.
    #[arg(long, env = "ROOTSCALE_AGENT_TLS_CA")]
    agent_tls_ca: Option<PathBuf>,
    /// PEM file: the operator's client certificate, presented to the agents (mutual TLS, which agents serving TLS
    /// require). Goes with --agent-tls-key; needs --agent-tls-ca.
    #[arg(long, env = "ROOTSCALE_AGENT_TLS_CERT")]
    agent_tls_cert: Option<PathBuf>,
    /// PEM file: the private key of --agent-tls-cert.
    #[arg(long, env = "ROOTSCALE_AGENT_TLS_KEY")]
    agent_tls_key: Option<PathBuf>,
    /// The name every agent's certificate must hold (a DNS SAN). Without it, the pod IP dialled, which then needs
    /// an IP SAN.
    #[arg(long, env = "ROOTSCALE_AGENT_TLS_SERVER_NAME")]
    agent_tls_server_name: Option<String>,
    /// The mesh key file (the agents' `ROOTSCALE_MESH_KEY_FILE`): every question to an agent carries the operator's
    /// proof made with it, which agents with a key require. Read again every resync, for rotation.
    #[arg(long, env = "ROOTSCALE_MESH_KEY_FILE")]
    mesh_key_file: Option<PathBuf>,
    /// The namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This instance's identity in the Lease (its pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Act without a Lease (only for a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// How long the Lease lasts without renewal (2 s–5 min); writes stop a fifth of it before it would expire
    /// unrenewed.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
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
    if args.lease_duration < Duration::from_secs(2) || args.lease_duration > Duration::from_secs(300) {
        return Err(format!("--lease-duration {:?} must be between 2s and 5m", args.lease_duration));
    }
    if !(1..=1024).contains(&args.concurrency) {
        return Err(format!("--concurrency {} must be between 1 and 1024", args.concurrency));
    }
    Ok(())
}

/// How the agents are called: the timeout, the token and TLS, with every file read and checked now.
fn agent_client(args: &RunArgs) -> Result<AgentClient, String> {
    let mut client = AgentClient::new(args.agent_timeout);
    if let Some(path) = &args.agent_token_file {
        let token = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read --agent-token-file {}: {error}", path.display()))?;
        client = client
            .with_token(token.trim())
            .map_err(|_| format!("--agent-token-file {}: the token must be non-empty visible ASCII", path.display()))?;
    }
    let files = AgentTlsFiles {
        ca: args.agent_tls_ca.clone(),
        cert: args.agent_tls_cert.clone(),
        key: args.agent_tls_key.clone(),
        server_name: args.agent_tls_server_name.clone().filter(|name| !name.is_empty()),
    };
    if let Some(tls) = AgentTls::load(&files).map_err(|error| error.to_string())? {
        client = client.with_tls(tls);
    }
    if let Some(path) = &args.mesh_key_file {
        let keys = KeyRing::from_file(path).map_err(|error| format!("--mesh-key-file: {error}"))?;
        client = client.with_mesh_keys(Arc::new(keys));
    }
    Ok(client)
}

/// An identity in the Lease for an instance started without `POD_NAME`: the host's name and a random suffix, so
/// two containers (both pid 1) never share one.
fn unique_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect::<String>())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "rootscale-operator".to_string());
    let suffix = rootscale_tracer::identity::keys::generate_key_text()
        .map(|text| text[..8].to_ascii_lowercase())
        .unwrap_or_else(|_| format!("{:x}", std::process::id()));
    format!("{host}-{suffix}")
}

/// Reads the mesh key file again every `period`: a rotated key is in force from the next resync on.
fn reload_mesh_keys(keys: Arc<KeyRing>, period: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            match keys.reload() {
                Ok(true) => tracing::info!("mesh key file changed: new keys in force"),
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "mesh key file unreadable: the keys in force stay"),
            }
        }
    });
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
        Command::Run(args) => *args,
    };
    if let Err(error) = check(&args) {
        eprintln!("{error}");
        return std::process::ExitCode::from(2);
    }
    let agents = match agent_client(&args) {
        Ok(agents) => agents,
        Err(error) => {
            eprintln!("{error}");
            return std::process::ExitCode::from(2);
        }
    };
    match agents.tls() {
        None if agents.has_token() => tracing::warn!(
            "the agent token travels in clear text: set --agent-tls-ca, --agent-tls-cert and --agent-tls-key to call \
             the agents over mutual TLS"
        ),
        None => tracing::info!("calling the agents over plain HTTP/2"),
        Some(tls) if !tls.mutual() => tracing::warn!(
            files = ?tls.files(),
            "calling the agents over TLS without a client certificate: rootscale's agents serving TLS require one \
             (--agent-tls-cert and --agent-tls-key) and will refuse these calls"
        ),
        Some(tls) => tracing::info!(files = ?tls.files(), "calling the agents over mutual TLS"),
    }
    match agents.mesh_keys() {
        Some(keys) => reload_mesh_keys(keys.clone(), args.resync),
        None if agents.tls().is_none() => tracing::warn!(
            "no --mesh-key-file: agents with a mesh key refuse the operator's questions without its proof"
        ),
        None => {}
    }
    let leader_election = if args.no_leader_election {
        None
    } else {
        let identity = args.identity.clone().unwrap_or_else(unique_identity);
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
        operator: OperatorConfig { resync: args.resync, agents, concurrency: args.concurrency },
        leader_election,
        lease_duration: args.lease_duration,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["rootscale-operator", "run"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(args) => *args,
            _ => unreachable!(),
        }
    }

    #[test]
    fn tls_flags_that_cannot_work_stop_the_start_with_the_flag_named() {
        assert!(agent_client(&run_args(&[])).unwrap().tls().is_none());
        for (flags, expected) in [
            (&["--agent-tls-cert=/x/tls.crt"][..], "--agent-tls-cert and --agent-tls-key go together"),
            (&["--agent-tls-cert=/x/tls.crt", "--agent-tls-key=/x/tls.key"], "need --agent-tls-ca"),
            (&["--agent-tls-server-name=rootscale-agent"], "--agent-tls-server-name needs --agent-tls-ca"),
            (&["--agent-tls-ca=/nonexistent/ca.crt"], "cannot read --agent-tls-ca /nonexistent/ca.crt"),
            (
                &["--agent-tls-ca=/nonexistent/ca.crt", "--agent-tls-cert=/x/tls.crt", "--agent-tls-key=/x/tls.key"],
                "cannot read --agent-tls-ca /nonexistent/ca.crt",
            ),
            (&["--agent-token-file=/nonexistent/token"], "cannot read --agent-token-file /nonexistent/token"),
        ] {
            let error = agent_client(&run_args(flags)).unwrap_err();
            assert!(error.contains(expected), "{flags:?}: {error}");
        }
    }

    #[test]
    fn an_empty_token_file_is_refused() {
        let path = std::env::temp_dir().join(format!("rootscale-empty-token-{}", std::process::id()));
        std::fs::write(&path, "\n").unwrap();
        let error = agent_client(&run_args(&[&format!("--agent-token-file={}", path.display())])).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(error.contains("must be non-empty visible ASCII"), "{error}");
    }
}
