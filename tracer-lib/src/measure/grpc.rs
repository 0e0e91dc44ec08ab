//! What a response says about gRPC: whether its status comes in trailers, and whether the status means the server
//! failed. Read by both the server and the client layer.

use http::{HeaderMap, HeaderName, HeaderValue, header::CONTENT_TYPE};

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// What a response head says about gRPC, read with one lookup of the content type: `grpc-status` is looked up only
/// in a response of the gRPC family, the only ones where it means anything.
pub(crate) struct GrpcHead {
    /// gRPC proper (not gRPC-Web, whose trailers travel inside the body): the status comes in trailers.
    trailers: bool,
    /// The status in the head (a trailers-only response), if any: whether it means the server failed.
    status_is_server_error: Option<bool>,
}

impl GrpcHead {
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        const GRPC: &[u8] = b"application/grpc";
        // A media type's name is case-insensitive, and parameters may follow it; a proxy's reply may carry a
        // status and no content type at all.
        let (trailers, family) = match headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes) {
            None => (false, true),
            Some(content_type) => match content_type.split_at_checked(GRPC.len()) {
                Some((name, rest)) if name.eq_ignore_ascii_case(GRPC) => match rest.first() {
                    None | Some(b'+' | b';') => (true, true),
                    Some(b'-') if rest.len() >= 4 && rest[..4].eq_ignore_ascii_case(b"-web") => (false, true),
                    _ => (false, false),
                },
                _ => (false, false),
            },
        };
        let status_is_server_error =
            if family { headers.get(GRPC_STATUS).map(grpc_status_is_server_error) } else { None };
        Self { trailers, status_is_server_error }
    }

    /// The status comes after the body, and so must the timing.
    pub(crate) fn deferred(&self) -> bool {
        self.trailers && self.status_is_server_error.is_none()
    }

    pub(crate) fn server_error(&self) -> bool {
        self.status_is_server_error == Some(true)
    }
}

/// A gRPC status that means the server failed (the OpenTelemetry convention): UNKNOWN, DEADLINE_EXCEEDED,
/// UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS. Client-side statuses (NOT_FOUND, INVALID_ARGUMENT, …) are not.
pub(crate) fn grpc_server_error(headers: &HeaderMap) -> bool {
    headers.get(GRPC_STATUS).is_some_and(grpc_status_is_server_error)
}

fn grpc_status_is_server_error(status: &HeaderValue) -> bool {
    matches!(status.as_bytes(), b"2" | b"4" | b"12" | b"13" | b"14" | b"15")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(content_type: Option<&'static str>, status: Option<&'static str>) -> GrpcHead {
        let mut headers = HeaderMap::new();
        if let Some(content_type) = content_type {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        }
        if let Some(status) = status {
            headers.insert(GRPC_STATUS, HeaderValue::from_static(status));
        }
        GrpcHead::of(&headers)
    }

    #[test]
    fn a_grpc_status_counts_only_in_a_response_of_the_grpc_family() {
        // gRPC proper: the status, and so the timing, come in trailers, unless the head already has it.
        for content_type in ["application/grpc", "application/grpc+proto"] {
            let streamed = head(Some(content_type), None);
            assert!(streamed.deferred() && !streamed.server_error(), "{content_type}");
            let failed = head(Some(content_type), Some("14"));
            assert!(!failed.deferred() && failed.server_error(), "{content_type}: trailers-only UNAVAILABLE");
            let refused = head(Some(content_type), Some("5"));
            assert!(!refused.deferred() && !refused.server_error(), "{content_type}: NOT_FOUND is the client's");
        }
        // Parameters and capitals do not change the type.
        for content_type in ["application/grpc; charset=utf-8", "Application/GRPC"] {
            assert!(head(Some(content_type), None).deferred(), "{content_type}");
            assert!(head(Some(content_type), Some("13")).server_error(), "{content_type}");
        }
        // gRPC-Web: trailers travel in the body, so nothing is deferred, but a status in the head still counts.
        let web = head(Some("application/grpc-web+proto"), Some("13"));
        assert!(!web.deferred() && web.server_error());
        // No content type (a proxy's reply): a status counts, and nothing is deferred.
        let bare = head(None, Some("14"));
        assert!(!bare.deferred() && bare.server_error());
        // Anything else: the header means nothing, and is not looked up.
        for content_type in [Some("text/plain"), Some("application/grpcx"), Some("application/json")] {
            let other = head(content_type, Some("13"));
            assert!(!other.deferred() && !other.server_error(), "{content_type:?}");
        }
    }
}
