//! gRPC both ways through the sidecar, with real tonic servers on loopback: a linked client (`svc-a`) calls an
//! unmodified gRPC application (`svc-b`, the standard health service) through its proxy's inbound port (HTTP/2),
//! and the application calls the linked `svc-c` through the proxy's local port for `svc-c`. Timing travels in the
//! trailers both ways.
//!
//! Stated tolerances: medians of every call, within −1/+10 ms of what the handlers sleep.

mod common;

use std::{
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use common::{Records, agent, assert_near, listen, median};
use futures_util::Stream;
use rootscale_proxy::Routes;
use rootscale_tracer::{
    WaitPoint,
    identity::{KeyRing, MeshKeys},
};
use tonic::{Request, Response, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus,
    health_client::HealthClient,
    health_server::{Health, HealthServer},
};
use tower::Layer;

const C_SLEEP: Duration = Duration::from_millis(30);
const B_SLEEP: Duration = Duration::from_millis(5);

type Watch = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

/// `svc-c`: slow, linked.
struct Slow;

#[tonic::async_trait]
impl Health for Slow {
    async fn check(&self, _: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        tokio::time::sleep(C_SLEEP).await;
        Ok(Response::new(HealthCheckResponse { status: ServingStatus::Serving as i32 }))
    }

    type WatchStream = Watch;

    async fn watch(&self, _: Request<HealthCheckRequest>) -> Result<Response<Watch>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

/// `svc-b`: knows nothing of rootscale; asks `svc-c` through the proxy, passing the trace context on.
struct Application {
    svc_c: HealthClient<Channel>,
}

#[tonic::async_trait]
impl Health for Application {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        tokio::time::sleep(B_SLEEP).await;
        let mut call = Request::new(HealthCheckRequest::default());
        for name in ["traceparent", "tracestate"] {
            if let Some(value) = request.metadata().get(name) {
                call.metadata_mut().insert(name, value.clone());
            }
        }
        self.svc_c.clone().check(call).await
    }

    type WatchStream = Watch;

    async fn watch(&self, _: Request<HealthCheckRequest>) -> Result<Response<Watch>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_in_and_out_are_measured_with_timing_in_the_trailers() {
    let keys = Arc::new(KeyRing::fixed(MeshKeys::generate().unwrap()));
    let c = agent("svc-c", &keys, false, None).await;
    let (listener, c_addr) = listen().await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder().layer(c.server_layer()).add_service(HealthServer::new(Slow));
    tokio::spawn(server.serve_with_incoming(incoming));

    let b_records = Arc::new(Records::default());
    let b = agent("svc-b", &keys, false, Some(b_records.clone())).await;
    let (app_listener, app_addr) = listen().await;
    let routes = Routes::default().with("svc-c", c_addr.to_string().parse().unwrap()).unwrap();
    let proxy = common::proxy(&b, app_addr, routes, &["svc-c"]).await;
    let to_c = Channel::from_shared(format!("http://{}", proxy.callee_addr("svc-c").unwrap())).unwrap().connect_lazy();
    let incoming = tonic::transport::server::TcpIncoming::from(app_listener).with_nodelay(Some(true));
    let app = tonic::transport::Server::builder()
        .add_service(HealthServer::new(Application { svc_c: HealthClient::new(to_c) }));
    tokio::spawn(app.serve_with_incoming(incoming));

    let a_records = Arc::new(Records::default());
    let a = agent("svc-a", &keys, false, Some(a_records.clone())).await;
    let channel = Channel::from_shared(format!("http://{}", proxy.inbound_addr())).unwrap().connect_lazy();
    let mut to_b = HealthClient::new(a.client_layer().callee("svc-b").unwrap().layer(channel));
    for _ in 0..20 {
        let answer = to_b.check(HealthCheckRequest::default()).await.expect("the call goes through");
        assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);
    }

    // svc-b, measured by its proxy: its call to svc-c counted toward each request.
    let requests = b_records.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 20);
    assert_near("svc-b downstream", median(requests.iter().map(|r| r.downstream).collect()), C_SLEEP);
    assert_near("svc-b local wait", median(requests.iter().map(|r| r.local_wait).collect()), B_SLEEP);
    let calls = b_records.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 20);
    assert!(calls.iter().all(|call| &*call.callee == "svc-c" && !call.error), "{:?}", calls.first());
    assert_near(
        "svc-c's total, from its trailers",
        median(calls.iter().filter_map(|c| c.remote_total).collect()),
        C_SLEEP,
    );
    assert_eq!(proxy.counters().correlated.load(Ordering::Relaxed), 20);
    // svc-a's calls: svc-b's timing came back in the trailers, pointing at svc-c.
    let a_calls = a_records.calls.lock().unwrap().clone();
    assert_eq!(a_calls.len(), 20);
    assert!(a_calls.iter().all(|call| &*call.callee == "svc-b"), "{:?}", a_calls.first());
    assert_near(
        "svc-b's total, as svc-a hears it",
        median(a_calls.iter().filter_map(|c| c.remote_total).collect()),
        C_SLEEP + B_SLEEP,
    );
    let pointed: Vec<&WaitPoint> = a_calls.iter().map(|call| &call.remote_wait.point).collect();
    assert!(
        pointed.iter().filter(|point| point.service() == "svc-c").count() >= 18,
        "the largest wait is svc-c's: {pointed:?}"
    );
    drop((a, b, c));
}
