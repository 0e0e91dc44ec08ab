//! Local mode: the whole rootscale loop on one machine, with real services on loopback.
//!
//! In the order a request and a decision flow:
//! 1. [`topology`]: the services, their calls and what one replica can do, from a YAML file;
//! 2. [`replica`]: one replica — a real HTTP or gRPC server with its own rootscale agent (measure, aggregate,
//!    exchange and decide happen there, in `rootscale-tracer`), its work modelled by a worker pool and virtual
//!    cores; or, for a service with `runtime: external`, [`external`]: the user's program behind rootscale-proxy;
//! 3. [`balance`]: callers reach a service's replicas through a p2c balancer fed by a discovery stream;
//! 4. [`cluster`]: every service's replicas, faults, and the local `ScaleTarget` that starts and drains them
//!    (first raising the process's limit on open files, [`open_files`]);
//! 5. [`load`] and [`scenario`]: Poisson load on a rate schedule, faults on a schedule;
//! 6. [`policy`]: who decides — rootscale's agents, or an HPA baseline — through the operator's engine; [`push`]:
//!    rootscale's policy also decides as soon as an agent says its service needs replicas;
//! 7. [`run`]: one run, second by second, and its timeline and summary; [`report`] prints them and [`live`]
//!    feeds them to the dashboard.

pub mod balance;
pub mod cluster;
pub mod external;
pub mod live;
pub mod load;
pub mod open_files;
pub mod policy;
pub mod push;
pub mod replica;
pub mod report;
pub mod run;
pub mod scenario;
pub mod topology;

/// What can go wrong in local mode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A topology file that cannot be used; the message names the file and line.
    #[error("{0}")]
    Topology(String),
    /// A scenario that cannot run on this topology (a fault on a missing service, …).
    #[error("{0}")]
    Scenario(String),
    /// A replica or the harness could not start.
    #[error("could not start: {0}")]
    Start(String),
}

/// The topologies shipped with the demo: (name, file contents).
pub const SHIPPED: [(&str, &str); 4] = [
    ("shop", include_str!("../../topologies/shop.yaml")),
    ("social", include_str!("../../topologies/social.yaml")),
    ("chain", include_str!("../../topologies/chain.yaml")),
    ("threads", include_str!("../../topologies/threads.yaml")),
];
