//! Example services, load generation and benchmarks for rootscale.
//!
//! - [`local`]: local mode — topologies from YAML files, replicas behind client-side balancing, load, faults and
//!   a policy scaling the replicas (the `demo` and `compare` commands).
//! - [`localization`]: the localization matrix on local mode's replicas and topology files: one fault at a time,
//!   and the check of who says what (the agent's tests and the `localize` command use it).

pub mod local;
pub mod localization;
pub mod simulate;

/// Logs to standard error, filtered by `RUST_LOG` (`default` when it is unset), so what the agents and the tracer
/// log — a token sent in clear text, refused reports, dropped connections — reaches whoever runs the binary.
pub fn init_logging(default: &str) {
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(error) => {
            if std::env::var_os("RUST_LOG").is_some() {
                eprintln!("RUST_LOG ignored ({error}); logging at {default}");
            }
            tracing_subscriber::EnvFilter::new(default)
        }
    };
    // Tests call binaries' code more than once per process; the first subscriber stays.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

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

/// One example service's request handling behind both faces the services have: `GET /` over HTTP (axum) and
/// `Demo.Call` over gRPC (tonic).
pub mod handler {
    use std::{future::Future, sync::Arc};

    use axum::{Router, http::StatusCode, routing::get};

    use crate::demo::{CallReply, CallRequest, demo_server::Demo, demo_server::DemoServer};

    /// What a service does with a request.
    pub trait Handle: Send + Sync + 'static {
        fn name(&self) -> &str;
        fn handle(&self) -> impl Future<Output = Result<(), String>> + Send;
    }

    /// `GET /`: 200 when the handler succeeds, 502 with its error otherwise.
    pub fn http_router<H: Handle>(handler: Arc<H>) -> Router {
        Router::new().route(
            "/",
            get(move || {
                let handler = handler.clone();
                async move {
                    match handler.handle().await {
                        Ok(()) => (StatusCode::OK, "ok".to_string()),
                        Err(error) => (StatusCode::BAD_GATEWAY, error),
                    }
                }
            }),
        )
    }

    /// `Demo.Call`: the service's name when the handler succeeds, UNAVAILABLE with its error otherwise.
    pub fn grpc_service<H: Handle>(handler: Arc<H>) -> DemoServer<GrpcHandler<H>> {
        DemoServer::new(GrpcHandler(handler))
    }

    pub struct GrpcHandler<H>(Arc<H>);

    #[tonic::async_trait]
    impl<H: Handle> Demo for GrpcHandler<H> {
        async fn call(&self, _: tonic::Request<CallRequest>) -> Result<tonic::Response<CallReply>, tonic::Status> {
            match self.0.handle().await {
                Ok(()) => Ok(tonic::Response::new(CallReply { service: self.0.name().to_string() })),
                Err(error) => Err(tonic::Status::unavailable(error)),
            }
        }
    }
}
