//! The controller: [`reconcile`] ties the pieces to the Kubernetes API — what the watches keep ([`cache`]), which
//! pods to ask ([`pods`]), the Deployment's `/scale` ([`target`]) and what to write back ([`status`]).

pub mod cache;
pub mod pods;
pub mod reconcile;
pub mod status;
pub mod target;
