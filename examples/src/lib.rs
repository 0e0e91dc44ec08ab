//! Example services, load generation and benchmarks for rootscale.
//!
//! - [`localization`]: real services on loopback, each with its own rootscale agent, faults injected at run time,
//!   and the check of who says what (the agent's tests and the `localize` command use it).
//! - [`local`]: local mode — topologies from YAML files, replicas behind client-side balancing, load, faults and
//!   a policy scaling the replicas (the `demo` and `compare` commands).

pub mod local;
pub mod localization;

/// The example services' gRPC API (`proto/demo.proto`).
pub mod demo {
    #![allow(missing_docs)]
    tonic::include_proto!("rootscale.demo.v1");
}

/// Calls the example services make to each other.
pub mod calls {
    use std::fmt::Display;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use tower::{Service, ServiceExt};

    /// A GET to `uri` through `client`, read to its end; a non-2xx status is an error.
    pub async fn http_get<S, B>(client: S, uri: &str) -> Result<(), String>
    where
        S: Service<http::Request<Empty<Bytes>>, Response = http::Response<B>>,
        S::Error: Display,
        B: hyper::body::Body,
        B::Error: Display,
    {
        let request = http::Request::get(uri).body(Empty::new()).map_err(|e| e.to_string())?;
        let response = client.oneshot(request).await.map_err(|e| e.to_string())?;
        let ok = response.status().is_success();
        response.into_body().collect().await.map_err(|e| e.to_string())?;
        if ok { Ok(()) } else { Err("callee failed".into()) }
    }
}
