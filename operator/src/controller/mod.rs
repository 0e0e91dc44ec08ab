//! The controller: [`reconcile`] ties the pieces to the Kubernetes API — what the watches keep ([`cache`]), which
//! pods to ask ([`pods`]), the Deployment's `/scale` ([`target`]) and what to write back ([`status`]); [`pushes`]
//! reconciles a Deployment at once when one of its agents says it needs replicas.

pub mod cache;
pub mod pods;
pub mod pushes;
pub mod reconcile;
pub mod status;
pub mod target;
