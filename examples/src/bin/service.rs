//! An example service for the Kubernetes manifests in `examples/k8s/`: an HTTP service instrumented with
//! rootscale, whose agent comes up from the environment (`ROOTSCALE_SERVICE`, `POD_IP`, …). Each request holds a
//! worker-pool slot for `--work`, then calls every `--call` URL in turn.
//!
//! `service --port 8080 --work 10ms --pool 64 --call http://payments:8080/`

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, http::StatusCode, routing::get};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rootscale_tracer::Agent;
use tower::{ServiceBuilder, ServiceExt};

#[derive(Parser)]
struct Args {
    /// Where the service listens.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Time each request holds a worker-pool slot.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    work: Duration,
    /// Worker-pool slots (requests served at once).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pool: u32,
    /// URLs called for every request, one after another.
    #[arg(long)]
    call: Vec<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    rootscale_examples::init_logging("info");
    let agent = match Agent::from_env() {
        Ok(builder) => match builder.concurrency(args.pool).start().await {
            Ok(agent) => agent,
            Err(error) => {
                eprintln!("cannot start the rootscale agent: {error}");
                return std::process::ExitCode::FAILURE;
            }
        },
        Err(error) => {
            eprintln!("{error}");
            return std::process::ExitCode::from(2);
        }
    };
    let pool = Arc::new(tokio::sync::Semaphore::new(args.pool as usize));
    let client = ServiceBuilder::new()
        .layer(agent.client_layer())
        .service(Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>());
    let (work, calls) = (args.work, Arc::new(args.call));
    let app = Router::new()
        .route(
            "/",
            get(move || {
                let (pool, client, calls) = (pool.clone(), client.clone(), calls.clone());
                async move {
                    {
                        let Ok(_slot) = pool.acquire().await else {
                            return (StatusCode::SERVICE_UNAVAILABLE, "closed");
                        };
                        tokio::time::sleep(work).await;
                    }
                    for url in calls.iter() {
                        let Ok(request) = http::Request::get(url.as_str()).body(Empty::new()) else {
                            return (StatusCode::INTERNAL_SERVER_ERROR, "bad --call URL");
                        };
                        match client.clone().oneshot(request).await {
                            Ok(response) if response.status().is_success() => {
                                let _ = response.into_body().collect().await;
                            }
                            _ => return (StatusCode::BAD_GATEWAY, "a callee failed"),
                        }
                    }
                    (StatusCode::OK, "ok")
                }
            }),
        )
        .layer(agent.server_layer())
        // Probes are not traffic: added after the layer, so they are not measured.
        .route("/healthz", get(|| async { "ok" }));
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("cannot listen on {}: {error}", args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    // Kubernetes stops a pod with SIGTERM: finish the requests in flight, then stop the agent.
    let served = axum::serve(listener, app).with_graceful_shutdown(terminated()).await;
    agent.shutdown(std::time::Duration::from_secs(2)).await;
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C (if neither can be listened for, never: the process is then stopped by force).
async fn terminated() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("stopping: finishing the requests in flight");
}
