//! rootscale's Kubernetes operator. It asks each pod's agent for its recommendation and applies it to annotated
//! Deployments. Not built yet: this crate holds the workspace slot until the operator issue lands.
