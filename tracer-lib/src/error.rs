//! The crate's one error type.

use std::time::Duration;

/// What can go wrong setting up rootscale's tracer. Nothing on the request path returns errors: a problem there is
/// counted and the user's request goes on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid service name {0:?}: use 1-63 characters of letters, digits, '-', '_' or '.'")]
    InvalidServiceName(String),
    #[error("invalid agent address {0:?}: use host:port, e.g. 10.0.3.7:9797")]
    InvalidAgentAddress(String),
    #[error("invalid window length {0:?}: use between 100ms and 1h")]
    InvalidWindow(Duration),
    #[error("invalid edge cap {0}: use between 1 and 4096")]
    InvalidEdgeCap(usize),
    #[error("agent configuration: {0}")]
    Config(String),
    #[error("cannot bind the agent's port {addr}: {error}")]
    Bind { addr: std::net::SocketAddr, error: std::io::Error },
    #[error("agent TLS: {0}")]
    Tls(String),
    #[error("mesh key: {0}")]
    MeshKey(String),
}

impl Error {
    /// A short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidServiceName(_) => "invalid_service_name",
            Error::InvalidAgentAddress(_) => "invalid_agent_address",
            Error::InvalidWindow(_) => "invalid_window",
            Error::InvalidEdgeCap(_) => "invalid_edge_cap",
            Error::Config(_) => "config",
            Error::Bind { .. } => "bind",
            Error::Tls(_) => "tls",
            Error::MeshKey(_) => "mesh_key",
        }
    }
}
