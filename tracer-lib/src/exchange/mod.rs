//! Exchange: once per window each agent trades a `NeighborReport` with every neighbour it saw in that window
//! (DESIGN.md 1.4): its view of the edge between them, its own wait summary, its verdict and, toward a callee it
//! suspects, a delegation.
//!
//! - [`report`]: building reports from a closed window, and checking received ones (every field is untrusted).
//! - [`neighbors`]: who the neighbours are, their agents, what they last said, and which ones stopped answering.
//! - [`sender`]: sending reports concurrently, each bounded in time, never on the request path.

pub mod neighbors;
pub mod report;
pub mod sender;
