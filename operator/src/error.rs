//! The crate's one error type.

/// What can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A behaviour or bound that cannot work (for example min above max).
    #[error("invalid scaling configuration: {0}")]
    InvalidConfig(String),
    /// The TLS settings toward the agents cannot work: a flag missing its partner, a file missing or malformed.
    #[error("agent TLS: {0}")]
    AgentTls(String),
    /// The scale target could not be read or changed.
    #[error("scale target: {0}")]
    Target(String),
    /// The target changed between reading and writing it (Kubernetes: 409 on a stale resourceVersion): decide again
    /// on fresh state.
    #[error("the scale target changed since it was read")]
    Conflict,
    /// A Kubernetes API call failed.
    #[cfg(feature = "kubernetes")]
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// A short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidConfig(_) => "invalid_config",
            Error::AgentTls(_) => "agent_tls",
            Error::Target(_) => "target",
            Error::Conflict => "conflict",
            #[cfg(feature = "kubernetes")]
            Error::Kube(_) => "kube",
        }
    }
}
