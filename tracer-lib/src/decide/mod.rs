//! Decide: the local rule every service runs on its own closed window (docs/DESIGN.md §1.4–1.5).
//!
//! - [`policy`]: is this service the bottleneck? The SLO trigger at entry services (or a delegation from a
//!   caller), then the comparison of the service's own `local_wait` with each outbound edge's `net_wait` and
//!   `remote_wait` at the SLO's percentile: delegate to the callee where the largest wait is, or declare the root
//!   cause (or a slow link). Also `saturated` and `idle` from the service's own utilisation.
//! - [`pool`]: in a service whose workers are held for the whole request, how the queue for a worker divides
//!   among the service itself, its links and the callees that held the workers.
//! - [`recommend`]: how many replicas this replica's load calls for (utilisation law and Little's law).
//!
//! - [`inputs`]: what the two are run with for one window — the settings in force, the utilisation history, the
//!   neighbours and the delegations received.
//! - [`decider`]: one replica's decision loop around them — closed windows and received reports in, reports out —
//!   with no clock, socket or lock, so the agent and the simulator run the same code.
//!
//! `policy` and `recommend` are pure functions of their inputs, so they are tested without servers.

pub mod decider;
pub mod inputs;
pub mod policy;
pub mod pool;
pub mod recommend;

pub use policy::{AggregationMode, Decision, Delegated, PolicyConfig, PolicyInput, Slo, Verdict, decide};
pub use recommend::{Capacity, PoolScope, Recommendation, recommend};
