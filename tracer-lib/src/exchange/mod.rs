//! Exchange: once per window each agent trades a `NeighborReport` with every neighbour it saw in that window
//! (docs/DESIGN.md §1.4): its view of the edge between them, its own wait summary, its verdict and, toward a callee it
//! suspects, a delegation.
//!
//! - [`report`]: the report's wire form, built from a closed window, and the strict checks of received ones (every
//!   field is untrusted).
//! - [`outbox`]: the reports a decided window sends, with the delegation passed on along its path.
//! - [`sender`]: sending them concurrently, each bounded in time, with the report's proof, never on the request path,
//!   over [`channels`] (one cached gRPC channel per agent, shared with the operator's client).
//! - [`inbox`]: receiving: only from agents seen on this service's own edges; delegations kept per window.
//! - [`neighbors`]: who the neighbours are, their agents, what they last said, and which ones stopped answering.

pub mod channels;
pub mod inbox;
pub mod neighbors;
pub mod outbox;
pub mod report;
pub mod sender;
