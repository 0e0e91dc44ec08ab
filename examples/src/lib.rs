//! Example services, load generation and benchmarks for rootscale.
//!
//! - [`localization`]: real services on loopback, each with its own rootscale agent, faults injected at run time,
//!   and the check of who says what (the agent's tests and the `localize` command use it).
//! - [`local`]: local mode — topologies from YAML files, replicas behind client-side balancing, load, faults and
//!   a policy scaling the replicas (the `demo` and `compare` commands).

pub mod local;
pub mod localization;

/// The example services' gRPC API (`proto/demo.proto`).
pub mod demo {
    #![allow(missing_docs)]
    tonic::include_proto!("rootscale.demo.v1");
}
