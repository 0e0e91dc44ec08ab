//! rootscale's operator: it asks each pod's agent for its recommendation and applies it to annotated Deployments.
//!
//! So far: [`crd`], the `ScalingDecision` resource; [`agents`], asking each pod's agent for its recommendation; [`annotations`], the strict parsing of a Deployment's `rootscale.dev/*` annotations, and [`engine`], the
//! decision engine, a library with no Kubernetes in it — combine the replicas'
//! recommendations, then HPA's behaviour (tolerance, stabilisation, rate policies, bounds) — and the
//! [`engine::ScaleTarget`] trait it drives. The Kubernetes controller is still to come.

pub mod agents;
pub mod annotations;
pub mod controller;
pub mod crd;
pub mod engine;
mod error;
pub mod metrics;
pub mod rbac;
pub mod run;

pub use error::Error;
