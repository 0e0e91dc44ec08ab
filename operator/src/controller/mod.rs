//! The controller's pieces that need no API server: which pods to ask ([`pods`]) and what to write back
//! ([`status`]). The reconcile loop that ties them to the Kubernetes API is still to come.

pub mod pods;
pub mod status;
