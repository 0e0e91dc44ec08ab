//! The agent: one per service replica. It wires the flow's steps onto its own thread and gRPC port: it closes the
//! tracer's windows, trades reports with its neighbours ([`crate::exchange`]), runs the local rule
//! ([`crate::decide`]) and answers the operator's `Advisor` calls.
//!
//! - `settings`: defaults, the environment, the builder. `start`: the thread, the port, the tasks.
//! - `state`: what the agent knows, and each window's steps wired in order.
//! - `port`: the gRPC port — who may call (`access`), the handlers, health, reflection, `/metrics`, and its limits.
//!
//! ```no_run
//! # async fn example() -> Result<(), rootscale_tracer::Error> {
//! // Service name, port, window, SLO… from the environment (ROOTSCALE_SERVICE, ROOTSCALE_AGENT_LISTEN, …),
//! // overridable in code.
//! let agent = rootscale_tracer::Agent::from_env()?.start().await?;
//! let app: axum::Router = axum::Router::new().layer(agent.server_layer());
//! # let _ = app;
//! # Ok(())
//! # }
//! ```

mod port;
mod settings;
mod start;

/// Resolves when `stop` turns true. If the [`Agent`] handle was dropped without [`Agent::shutdown`], it never
/// resolves: dropping the handle leaves the agent running with the service.
pub(crate) async fn stop_requested(stop: &mut tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}
mod metrics;
mod state;

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub use settings::{AgentBuilder, DEFAULT_AGENT_PORT, DEFAULT_MAX_NEIGHBORS, TlsFiles};
pub use state::AgentSnapshot;
use tokio::sync::{oneshot, watch};

use crate::{ClientLayer, ServerLayer, Tracer, decide::Decision};

/// A running agent. Dropping the handle leaves it running with the service; call [`Agent::shutdown`] to stop it.
pub struct Agent {
    tracer: Tracer,
    state: Arc<state::AgentState>,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    /// Resolves when the agent's thread has finished.
    done: oneshot::Receiver<()>,
}

impl Agent {
    /// A builder with defaults from the environment (see [`AgentBuilder::from_env`]).
    pub fn from_env() -> Result<AgentBuilder, crate::Error> {
        AgentBuilder::from_env()
    }

    /// A builder for `service` with the built-in defaults, ignoring the environment.
    pub fn builder(service: &str) -> AgentBuilder {
        AgentBuilder::new(service)
    }

    /// The tracer whose windows this agent closes.
    pub fn tracer(&self) -> &Tracer {
        &self.tracer
    }

    pub fn server_layer(&self) -> ServerLayer {
        self.tracer.server_layer()
    }

    pub fn client_layer(&self) -> ClientLayer {
        self.tracer.client_layer()
    }

    /// Where the agent's gRPC port is bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The decision for the latest closed window.
    pub fn decision(&self) -> Decision {
        self.state.decision()
    }

    /// Everything the agent knows now.
    pub fn snapshot(&self) -> AgentSnapshot {
        self.state.snapshot()
    }

    /// Stops serving and closing windows, waiting up to `grace` for in-flight gRPC calls to finish.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(grace, self.done).await;
    }

    /// A cheap handle for reading the agent's decisions from elsewhere (another thread, a dashboard).
    pub fn view(&self) -> AgentView {
        AgentView { state: self.state.clone() }
    }
}

/// Reads a running agent's state. Made by [`Agent::view`].
#[derive(Clone)]
pub struct AgentView {
    state: Arc<state::AgentState>,
}

impl AgentView {
    pub fn service(&self) -> &str {
        &self.state.service
    }

    /// The decision for the latest closed window.
    pub fn decision(&self) -> Decision {
        self.state.decision()
    }

    /// Everything the agent knows now.
    pub fn snapshot(&self) -> AgentSnapshot {
        self.state.snapshot()
    }

    /// Reports sent so far and their encoded bytes.
    pub fn reports_sent(&self) -> (u64, u64) {
        self.state.metrics.reports_sent()
    }
}
