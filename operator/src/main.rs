//! `rootscale-operator`: `crd` prints the ScalingDecision CRD; the controller itself is not built yet.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "rootscale-operator", version, about = "rootscale's Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ScalingDecision CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> std::process::ExitCode {
    match Cli::parse().command {
        Command::Crd => match rootscale_operator::crd::yaml() {
            Ok(text) => {
                print!("{text}");
                std::process::ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("cannot render the CRD: {error}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}
