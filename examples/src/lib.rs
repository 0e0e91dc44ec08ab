//! Example services, load generation and benchmarks for rootscale.
//!
//! - [`localization`]: real services on loopback, each with its own rootscale agent, faults injected at run time,
//!   and the check of who says what (the agent's tests and the `localize` command use it).

pub mod localization;

/// The example services' gRPC API (`proto/demo.proto`).
pub mod demo {
    #![allow(missing_docs)]
    tonic::include_proto!("rootscale.demo.v1");
}
