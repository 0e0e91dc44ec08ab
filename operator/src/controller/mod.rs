//! The controller: [`reconcile`] ties the pieces to the Kubernetes API — which pods to ask ([`pods`]), the
//! Deployment's `/scale` ([`target`]) and what to write back ([`status`]).

pub mod pods;
pub mod reconcile;
pub mod status;
pub mod target;
