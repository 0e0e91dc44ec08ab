//! rootscale's operator: it asks each pod's agent for its recommendation and applies it to annotated Deployments.
//!
//! - [`engine`]: the decision engine, with no Kubernetes in it — combine the replicas' recommendations, then HPA's
//!   behaviour (tolerance, stabilisation, rate policies, bounds) — and the [`engine::ScaleTarget`] it drives. The
//!   local demo (`rootscale-examples`) drives its own replicas with it.
//! - [`agents`]: asking each replica's agent for its recommendation (`Advisor.Recommend`).
//! - [`tls`]: TLS toward the agents (the CA, the operator's client certificate), checked once at start.
//! - [`annotations`]: the strict parsing of a Deployment's `rootscale.dev/*` annotations.
//! - With the `kubernetes` feature (on by default): [`controller`] (the reconcile), [`crd`] (`ScalingDecision`),
//!   [`rbac`] (every API call the operator makes), [`dashboard`] (managed Deployments on the web dashboard),
//!   [`leadership`] (the Lease, with every write fenced by a local deadline) and [`run`] (the watches, probes,
//!   metrics, the dashboard's server, shutdown).

pub mod agents;
pub mod annotations;
#[cfg(feature = "kubernetes")]
pub mod controller;
#[cfg(feature = "kubernetes")]
pub mod crd;
#[cfg(feature = "kubernetes")]
pub mod dashboard;
pub mod engine;
mod error;
#[cfg(feature = "kubernetes")]
pub mod leadership;
pub mod metrics;
#[cfg(feature = "kubernetes")]
pub mod rbac;
#[cfg(feature = "kubernetes")]
pub mod run;
pub mod tls;

pub use error::Error;
