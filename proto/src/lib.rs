//! rootscale's wire types: the per-window reports neighbours trade (`Neighbor.Exchange`) and the questions the
//! operator and tools ask an agent (`Advisor`). Generated from `rootscale/v1/*.proto` at build time.
//!
//! Every message here crosses a process boundary: receivers validate before use (see the tracer's `exchange`).

/// Package `rootscale.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::doc_markdown, clippy::large_enum_variant)]
    tonic::include_proto!("rootscale.v1");
}

/// The encoded `FileDescriptorSet` of every rootscale proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rootscale_descriptor.bin"));

/// The version of the report format this build speaks; receivers reject other versions.
pub const REPORT_VERSION: u32 = 1;
