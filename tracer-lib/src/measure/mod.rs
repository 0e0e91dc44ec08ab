//! Measure: what one request and each of its outbound calls spent where (docs/DESIGN.md §1.1), and the in-band headers
//! that carry a callee's timing back to its caller (docs/DESIGN.md §1.2).
//!
//! - [`clock`]: the clock every measurement reads.
//! - [`server`]: the layer on a service's inbound side.
//! - [`client`]: the layer on its outbound HTTP/gRPC clients.
//! - [`downstream`]: the same for any other future (a database call).
//! - [`context`]: the per-request state they share, found through a thread-local slot set for each poll.
//! - [`grpc`]: what a response's gRPC headers say (status in trailers, a server error).
//! - [`headers`]: the strict wire format of `rootscale-caller` and `rootscale-timing`.
//! - [`record`]: the values measured.
//! - [`sample`]: which requests are measured, with `ROOTSCALE_SAMPLE`.
//! - [`reuse`]: what a thread keeps for reuse: finished request contexts, and the boxes a call's state travels in.

pub mod client;
pub mod clock;
pub mod context;
pub mod downstream;
pub mod grpc;
pub mod headers;
pub mod record;
pub(crate) mod reuse;
pub mod sample;
pub mod server;
