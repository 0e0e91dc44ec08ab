//! What the engine scales: a Deployment's `/scale` subresource in Kubernetes (`controller/target.rs`), local
//! replicas in the demo.

use std::future::Future;

use crate::Error;

/// Something with a replica count that can be read and set.
pub trait ScaleTarget {
    /// The replicas it has now (the spec, as HPA reads `/scale`). After a [`Error::Conflict`], read fresh.
    fn current_replicas(&self) -> impl Future<Output = Result<u32, Error>> + Send;
    /// Asks for `replicas`, conditionally on the count read: [`Error::Conflict`] when it changed in between.
    fn set_replicas(&self, replicas: u32) -> impl Future<Output = Result<(), Error>> + Send;
}
