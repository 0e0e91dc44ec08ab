//! Messages refused before a handler sees them. tonic answers a message it cannot decode with INTERNAL and one over
//! the size limit with OUT_OF_RANGE (RESOURCE_EXHAUSTED when it decompresses too large); the agent's own handlers
//! never use those codes, so here every one of them is the caller's fault. The port answers INVALID_ARGUMENT
//! instead, keeps tonic's message, and counts the refusal by reason. It also marks the connection as having carried
//! a request ([`super::connections`]).

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::HeaderValue,
    middleware::Next,
    response::Response,
};
use tonic::transport::server::TlsConnectInfo;

use crate::agent::{port::connections::ConnectionInfo, state::AgentState};

const GRPC_STATUS: &str = "grpc-status";
const INTERNAL: &[u8] = b"13";
const OUT_OF_RANGE: &[u8] = b"11";
const RESOURCE_EXHAUSTED: &[u8] = b"8";
const INVALID_ARGUMENT: HeaderValue = HeaderValue::from_static("3");

pub(crate) async fn refuse_undecodable(State(state): State<Arc<AgentState>>, request: Request, next: Next) -> Response {
    let extensions = request.extensions();
    let connection = extensions
        .get::<ConnectionInfo>()
        .or_else(|| extensions.get::<TlsConnectInfo<ConnectionInfo>>().map(TlsConnectInfo::get_ref));
    if let Some(connection) = connection {
        connection.mark_served();
    }
    let mut response = next.run(request).await;
    let reason = match response.headers().get(GRPC_STATUS).map(HeaderValue::as_bytes) {
        Some(INTERNAL) => "undecodable",
        Some(OUT_OF_RANGE | RESOURCE_EXHAUSTED) => "oversize",
        _ => return response,
    };
    state.metrics.refused_message(reason);
    tracing::debug!(service = %state.service, reason, "refused a gRPC message before decoding it");
    response.headers_mut().insert(GRPC_STATUS, INVALID_ARGUMENT);
    response
}
