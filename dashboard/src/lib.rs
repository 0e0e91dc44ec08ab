//! rootscale's dashboard: one read-only web page, served by axum from the operator (Kubernetes) and from the
//! local demo — the same code, fed differently.
//!
//! - [`model`]: what is shown — [`Frame`]s (every service and call at one moment: replicas, verdict, latency
//!   against its target, local / network / remote wait, calls per second; the delegation path from the entry to
//!   the root cause) and [`Event`]s (faults, scaling decisions with their reasons).
//! - [`Dashboard`]: keeps a bounded history of both and fans updates out to browsers.
//! - [`server`]: the HTTP side — the page and its script and style, embedded in the binary (no build step, no
//!   CDN), `GET api/state` and `GET api/stream` (server-sent events). Nothing can be changed through it.

pub mod model;
pub mod server;
mod state;

pub use model::{EdgeView, Event, EventKind, Frame, ServiceView};
pub use state::{Dashboard, StateView};
