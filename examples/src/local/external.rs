//! A replica of an external service: the user's program, in any language, run as a child process behind
//! `rootscale-proxy`, which measures it from outside and hosts its agent — as the sidecar does in a pod.
//!
//! The program learns what it needs from its environment:
//! - `PORT`: the loopback port to listen on (HTTP/1.1); the proxy's inbound port is the replica's address;
//! - `HTTP_PROXY` (and `http_proxy`): the proxy's outbound port; it calls a callee as `http://<name>/`;
//! - `SERVICE_NAME`, `SERVICE_CALLS` (its callees in the topology's order, comma-separated), `SERVICE_POOL` (the
//!   topology's `capacity`) and `SERVICE_WORK_MS` (the mean `service_time`), for programs that model work, as
//!   `examples/python/service.py` does.
//!
//! Each callee is routed to a front on loopback that balances over the callee's live replicas (p2c), as the
//! modelled replicas' own clients do; the front is one loopback hop, measured as part of the link. Faults act on
//! modelled services only: the program's work is its own.

use std::{
    convert::Infallible,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rootscale_proxy::{Proxy, ProxyConfig, Routes};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tower::{BoxError, ServiceExt};

use crate::local::{
    Error,
    balance::{self, HttpReplica},
    replica::{Ready, ReplicaConfig, agent_builder},
    topology::ServiceTime,
};

/// How long the program may take to listen on its port.
const START_WITHIN: Duration = Duration::from_secs(15);
/// A draining replica stops once no request has been open at its proxy for this long.
const QUIET: Duration = Duration::from_millis(150);

/// The program, killed when dropped.
struct Program(Child);

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type FrontBody = UnsyncBoxBody<Bytes, BoxError>;

/// Serves `listener`: every request goes on to one of `registry`'s replicas, as it came.
fn front(listener: TcpListener, registry: tokio::sync::watch::Receiver<balance::Replicas>) -> JoinHandle<()> {
    let client = balance::balanced(registry, HttpReplica::<Incoming>::connect);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let client = client.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let client = client.clone();
                async move {
                    let response: Response<FrontBody> = match client.oneshot(request).await {
                        Ok(response) => response.map(|body| body.map_err(BoxError::from).boxed_unsync()),
                        Err(error) => {
                            let mut answer = Response::new(
                                Full::new(Bytes::from(format!("no replica answered: {error}\n")))
                                    .map_err(|never: Infallible| match never {})
                                    .boxed_unsync(),
                            );
                            *answer.status_mut() = StatusCode::BAD_GATEWAY;
                            answer
                        }
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(async move {
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

/// A free loopback port (the kernel picks it; nothing else on loopback takes it before the program does).
fn free_port() -> Result<u16, Error> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Start(e.to_string()))?;
    Ok(listener.local_addr().map_err(|e| Error::Start(e.to_string()))?.port())
}

fn mean_ms(service_time: ServiceTime) -> f64 {
    service_time.mean().as_secs_f64() * 1e3
}

/// Starts the program behind its proxy and waits until it listens.
async fn start(
    config: &ReplicaConfig,
    command: &[String],
) -> Result<(rootscale_tracer::Agent, Proxy, Program, Vec<JoinHandle<()>>), Error> {
    let spec = &config.spec;
    let start_error =
        |what: &str, error: &dyn std::fmt::Display| Error::Start(format!("{}: {what}: {error}", spec.name));
    let agent = agent_builder(config).start().await.map_err(|e| start_error("its agent", &e))?;
    let mut routes = Routes::default();
    let mut fronts = Vec::new();
    for (name, (_, registry)) in &config.callees {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| start_error("a callee's front", &e))?;
        let addr = listener.local_addr().map_err(|e| start_error("a callee's front", &e))?;
        routes = routes
            .with(name, addr.to_string().parse().map_err(|e| start_error("a route", &e))?)
            .map_err(|e| start_error("a route", &e))?;
        fronts.push(front(listener, registry.clone()));
    }
    let app = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut proxy_config = ProxyConfig::new(app);
    proxy_config.inbound = SocketAddr::from(([127, 0, 0, 1], 0));
    proxy_config.outbound = SocketAddr::from(([127, 0, 0, 1], 0));
    proxy_config.routes = routes;
    let proxy = Proxy::start(&proxy_config, &agent).await.map_err(|e| start_error("its proxy", &e))?;
    let outbound = format!("http://{}", proxy.outbound_addr());
    let calls: Vec<&str> = spec.steps.iter().flat_map(|step| step.callees.iter().map(String::as_str)).collect();
    let child = Command::new(&command[0])
        .args(&command[1..])
        .env("PORT", app.port().to_string())
        .env("HTTP_PROXY", &outbound)
        .env("http_proxy", &outbound)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("SERVICE_NAME", &spec.name)
        .env("SERVICE_CALLS", calls.join(","))
        .env("SERVICE_POOL", spec.capacity.to_string())
        .env("SERVICE_WORK_MS", format!("{:.3}", mean_ms(spec.service_time)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| start_error(&format!("running `{}`", command.join(" ")), &e))?;
    let mut program = Program(child);
    let deadline = Instant::now() + START_WITHIN;
    loop {
        if let Ok(Some(status)) = program.0.try_wait() {
            return Err(Error::Start(format!(
                "{}: `{}` exited ({status}) before listening",
                spec.name,
                command.join(" ")
            )));
        }
        if tokio::net::TcpStream::connect(app).await.is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(Error::Start(format!(
                "{}: `{}` did not listen on {app} within {START_WITHIN:?}",
                spec.name,
                command.join(" ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((agent, proxy, program, fronts))
}

/// Runs one replica of an external service until told to stop, then drains it: its callers have dropped it, so
/// it waits (up to the deadline) until no request has been open at its proxy for a moment.
pub(crate) async fn serve(config: ReplicaConfig, command: &[String], ready: Ready, stop: oneshot::Receiver<Duration>) {
    let (agent, proxy, program, fronts) = match start(&config, command).await {
        Ok(started) => started,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let _ = ready.send(Ok((proxy.inbound_addr(), agent.local_addr(), agent.view())));
    let deadline = stop.await.unwrap_or(Duration::ZERO);
    let give_up = Instant::now() + deadline;
    let mut quiet_since = Instant::now();
    while Instant::now() < give_up {
        if proxy.correlator_open() > 0 {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= QUIET {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(program);
    proxy.stop();
    for front in fronts {
        front.abort();
    }
    agent.shutdown(Duration::from_millis(200)).await;
}
