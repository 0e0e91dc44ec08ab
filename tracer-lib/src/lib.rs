//! rootscale's tracer: tower layers that measure, for every request a service handles, where the request waited —
//! its own CPU and local resources, the network to each callee, or deeper inside a callee's subtree — and
//! aggregate it per window, with no central tracing backend.
//!
//! The flow, one module each:
//! 1. [`measure`]: server and client layers (and a wrapper for any future) time each request and call and trade
//!    small timing headers in-band.
//! 2. [`aggregate`]: every request is folded into wall-clock-aligned windows of mergeable histograms, with bounded
//!    memory and no global lock on the request path.
//! 3. [`exchange`]: once per window, reports to and from the neighbours over gRPC.
//! 4. [`decide`]: the local rule on each closed window — delegate, or declare the root cause — and a replica count.
//! 5. [`agent`]: wires the steps above onto one gRPC port per replica, for the neighbours and the operator.
//!
//! Beside the flow, [`identity`] proves membership of the mesh (the mesh key, mutual TLS), and [`metrics`] writes
//! the closed windows in Prometheus text format for an agent's `/metrics`.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use rootscale_tracer::Tracer;
//!
//! let tracer = Tracer::builder("checkout").agent_addr("10.0.3.7:9797").build()?;
//! tokio::spawn(tracer.run_window_closer());
//! let app: axum::Router = axum::Router::new()
//!     .route("/", axum::routing::get(|| async { "hello" }))
//!     .layer(tracer.server_layer());
//! # let _ = app;
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod aggregate;
pub mod decide;
mod error;
pub mod exchange;
pub mod identity;
pub mod measure;
pub mod metrics;
mod tracer;

pub use agent::{Agent, AgentBuilder, AgentView};
pub use error::Error;
pub use measure::{
    client::{ClientLayer, TraceClient},
    context::{InRequest, InRequestExt, RequestHandle},
    downstream::{Dependency, DependencyCall},
    headers::{CALLER_HEADER, TIMING_HEADER},
    record::{CallRecord, RequestRecord, Wait, WaitPoint},
    sample::{SAMPLE_RESERVOIR, SampleRate},
    server::{ServerLayer, TraceServer},
};
pub use tracer::{ClosedWindow, Counters, DEFAULT_EDGE_CAP, DEFAULT_WINDOW, Observer, Tracer, TracerBuilder};
