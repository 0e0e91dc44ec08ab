//! The simulator (`cargo run --release -p rootscale-examples --bin simulate`): generated call graphs of up to
//! 10,000 services, a queueing model of each replica's window, and every service's agent running the tracer's
//! own decision loop ([`rootscale_tracer::decide::decider::Decider`]: the rule, the replica count, the inbox and
//! outbox) and report validation, with reports sent through their wire form, delayed, lost and skewed — no
//! sockets, no tracer on the request path.
//!
//! - [`graph`]: the seeded graph generator.
//! - [`model`]: one window of every service, as its tracer would have aggregated it.
//! - [`run`]: the discrete-event run and what it measures (precision, recall, windows to detect, reports, bytes
//!   and decision time per agent per window).

pub mod graph;
pub mod model;
pub mod run;
