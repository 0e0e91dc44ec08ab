//! The layers on every kind of service and body they are meant for: a bare hyper service, streaming bodies that
//! end or are dropped, gRPC errors, wrapped non-HTTP dependencies, and calls made from spawned tasks.
//!
//! Timed values are medians over [`ROUNDS`] requests, within the bounds of `chain.rs` (`common::assert_near`).

mod common;

use std::{convert::Infallible, time::Duration};

use axum::{Router, body::Body, routing::get};
use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use rootscale_proto::v1::{
    NeighborAck, NeighborReport,
    neighbor_server::{Neighbor, NeighborServer},
};
use rootscale_tracer::{
    InRequestExt, TIMING_HEADER, Tracer,
    measure::headers::{Timing, WaitPointRef},
};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};

async fn serve_router(router: Router) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

/// The median of one duration of each record.
fn median_of<T>(records: &[T], field: impl Fn(&T) -> Duration) -> Duration {
    median(records.iter().map(field).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_hyper_service_is_measured() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (tracer, records) = traced("svc-hyper");
    let service = ServiceBuilder::new().layer(tracer.server_layer()).service_fn(
        |_request: Request<hyper::body::Incoming>| async {
            tokio::time::sleep(Duration::from_millis(15)).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    for response in drive(addr, &[&records]).await.responses {
        assert_eq!(response.body(), "hello");
        let header = response.headers()[TIMING_HEADER].to_str().unwrap();
        assert!(header.starts_with("v=1;s=svc-hyper;t=") && header.contains(";k=l;at=svc-hyper"), "{header}");
    }
    let requests = records.requests();
    assert_eq!(requests.len(), ROUNDS);
    assert_near("local_wait off the CPU", median_of(&requests, off_cpu), 15.0);
    assert!(requests.iter().all(|r| !r.error), "{requests:?}");
}

fn slow_stream(chunks: usize, gap: Duration) -> Body {
    Body::from_stream(futures_util::stream::iter(0..chunks).then(move |i| async move {
        tokio::time::sleep(gap).await;
        Ok::<_, Infallible>(Bytes::from(format!("chunk {i}\n")))
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_body_is_measured_until_it_ends() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (tracer, records) = traced("svc-stream");
    let router = Router::new()
        .route("/", get(|| async { slow_stream(3, Duration::from_millis(15)) }))
        .layer(tracer.server_layer());
    let addr = serve_router(router).await;
    let driven = drive(addr, &[&records]).await;
    for response in &driven.responses {
        assert_eq!(response.body(), "chunk 0\nchunk 1\nchunk 2\n");
    }
    let requests = records.requests();
    assert_eq!(requests.len(), ROUNDS);
    // Three timers in a row each fire up to a tick late, more on a loaded machine: above, the bound is what the
    // client saw of the same requests (a chunk counted twice, 15 ms, is more than any timer adds).
    let total = median_of(&requests, |r| r.total);
    let round_trip = median(driven.round_trips);
    assert!(
        total >= Duration::from_micros(44_500) && total <= round_trip,
        "total (streamed for 45 ms) = {total:?}, the client's round trip {round_trip:?}: {requests:?}"
    );
    assert!(requests.iter().all(|r| !r.error), "{requests:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_dropped_by_a_departing_client_is_recorded_as_cancelled() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (tracer, records) = traced("svc-stream");
    let router = Router::new()
        .route("/", get(|| async { slow_stream(100, Duration::from_millis(10)) }))
        .layer(tracer.server_layer());
    let addr = serve_router(router).await;
    let client = plain_client();
    let response = client.get(format!("http://{addr}/").parse().unwrap()).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let requests = records.requests();
    assert_eq!(requests.len(), 1, "the abandoned request is recorded once");
    assert!(requests[0].cancelled && !requests[0].error, "{:?}", requests[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_no_content_responses_are_complete() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (tracer, records) = traced("svc-head");
    let router = Router::new()
        .route("/", get(|| async { "a body that HEAD leaves out" }))
        .route("/empty", get(|| async { http::StatusCode::NO_CONTENT }));
    // Both ways of applying the layer: around the whole router, and on its routes.
    let wrapped = ServiceBuilder::new()
        .map_response(|response: Response<_>| response.map(Body::new))
        .layer(tracer.server_layer())
        .service(router.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let wrapped_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, tower::make::Shared::new(wrapped)).await });
    let layered_addr = serve_router(router.layer(tracer.server_layer())).await;
    let client = plain_client();
    for addr in [wrapped_addr, layered_addr] {
        let head = Request::head(format!("http://{addr}/")).body(Empty::<Bytes>::new()).unwrap();
        let response = client.request(head).await.unwrap();
        response.into_body().collect().await.unwrap();
        let empty = client.get(format!("http://{addr}/empty").parse().unwrap()).await.unwrap();
        assert_eq!(empty.status(), http::StatusCode::NO_CONTENT);
        empty.into_body().collect().await.unwrap();
    }
    settle().await;
    let requests = records.requests();
    assert_eq!(requests.len(), 4);
    for request in requests {
        assert!(!request.error && !request.cancelled, "{request:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_counts_its_own_cpu_as_busy() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (tracer, records) = traced("svc-stream");
    let router = Router::new()
        .route(
            "/",
            get(|| async {
                Body::from_stream(futures_util::stream::iter(0..3).map(|i| {
                    spin(Duration::from_millis(10));
                    Ok::<_, Infallible>(Bytes::from(format!("chunk {i}\n")))
                }))
            }),
        )
        .layer(tracer.server_layer());
    let addr = serve_router(router).await;
    drive(addr, &[&records]).await;
    let requests = records.requests();
    assert_eq!(requests.len(), ROUNDS);
    assert_near("busy", median_of(&requests, |r| r.busy), 30.0);
    assert!(median_of(&requests, off_cpu) < Duration::from_millis(3), "{requests:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_work_offloaded_to_another_pool_counts_as_busy_and_its_queue_as_cpu_wait() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (tracer, records) = traced("svc-offload");
    let router = Router::new()
        .route(
            "/",
            get(|| async {
                // 40 ms off the request's task: 10 ms queued for the pool, 30 ms running there.
                tokio::time::sleep(Duration::from_millis(40)).await;
                rootscale_tracer::RequestHandle::current()
                    .record_offloaded_cpu(Duration::from_millis(30), Duration::from_millis(10));
                "done"
            }),
        )
        .layer(tracer.server_layer());
    let addr = serve_router(router).await;
    drive(addr, &[&records]).await;
    let requests = records.requests();
    assert_eq!(requests.len(), ROUNDS);
    let (busy, cpu_wait) = (median_of(&requests, |r| r.busy), median_of(&requests, |r| r.cpu_wait));
    assert!(busy >= Duration::from_millis(30) && busy < Duration::from_millis(35), "{requests:?}");
    assert!(cpu_wait >= Duration::from_millis(10) && cpu_wait < Duration::from_millis(12), "{requests:?}");
    // What is left as local wait is the queueing (10 ms), not the work.
    assert_near("local_wait", median_of(&requests, |r| r.local_wait), 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uninstrumented_callee_is_named_by_its_address_and_its_wait_travels_upstream() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (a, _) = traced("svc-a");
    let (b, b_records) = traced("svc-b");
    let plain = Router::new().route(
        "/",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            "not instrumented"
        }),
    );
    let c_addr = serve_router(plain).await;
    let c_name = format!("127.0.0.1-{}", c_addr.port());
    let b_addr = serve_http(&b, Behavior::default().then(vec![Callee::http(&b, c_addr)])).await;
    let a_addr = serve_http(&a, Behavior::default().then(vec![Callee::http(&a, b_addr)])).await;
    let mut waits = Vec::new();
    for response in drive(a_addr, &[&b_records]).await.responses {
        let timing = Timing::parse(&response.headers()[TIMING_HEADER]).expect("A's timing header is valid");
        assert_eq!(timing.wait_point(), WaitPointRef::Local(&c_name));
        waits.push(Duration::from_micros(timing.wait_us));
    }
    assert_near("A's largest wait", median(waits), 30.0);
    let calls = b_records.calls();
    assert_eq!(calls.len(), ROUNDS);
    for call in calls {
        assert_eq!(&*call.callee, c_name);
        assert!(call.remote_total.is_none() && call.net_wait.is_none(), "{call:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_grpc_call_keeps_the_callee_name_learned_from_earlier_calls() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (server_tracer, _) = traced("svc-grpc");
    let (client_tracer, client_records) = traced("svc-caller");
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(server_tracer.server_layer())
            .add_service(NeighborServer::new(Echo))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    let Callee::Grpc(mut client) = Callee::grpc(&client_tracer, addr) else { unreachable!() };
    client.exchange(NeighborReport::default()).await.unwrap();
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(client.exchange(NeighborReport::default()).await.is_err());
    settle().await;
    let calls = client_records.calls();
    assert_eq!(calls.len(), 2);
    assert!(!calls[0].error && calls[1].error);
    assert!(calls.iter().all(|call| &*call.callee == "svc-grpc"), "{calls:?}");
}

struct Echo;

#[tonic::async_trait]
impl Neighbor for Echo {
    async fn exchange(&self, _: tonic::Request<NeighborReport>) -> Result<tonic::Response<NeighborAck>, tonic::Status> {
        Ok(tonic::Response::new(NeighborAck::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_header_can_be_withheld_from_third_parties() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (server, records) = traced("svc-third-party");
    let addr = serve_http(&server, Behavior::default()).await;
    let (tracer, _) = traced("svc-a");
    let client = ServiceBuilder::new().layer(tracer.client_layer().send_caller(false)).service(plain_client());
    let request = Request::get(format!("http://{addr}/")).body(Empty::<Bytes>::new()).unwrap();
    client.oneshot(request).await.unwrap().into_body().collect().await.unwrap();
    settle().await;
    assert_eq!(records.requests()[0].caller, None);
}

struct Failing;

#[tonic::async_trait]
impl Neighbor for Failing {
    async fn exchange(&self, _: tonic::Request<NeighborReport>) -> Result<tonic::Response<NeighborAck>, tonic::Status> {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Err(tonic::Status::internal("boom"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_are_counted_on_both_sides_and_still_timed() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (server_tracer, server_records) = traced("svc-grpc");
    let (client_tracer, client_records) = traced("svc-caller");
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let router = tonic::transport::Server::builder()
        .layer(server_tracer.server_layer())
        .add_service(NeighborServer::new(Failing));
    tokio::spawn(router.serve_with_incoming(incoming));
    let Callee::Grpc(mut client) = Callee::grpc(&client_tracer, addr) else { unreachable!() };
    // One call to set the connection up, then the timed ones.
    client.exchange(NeighborReport::default()).await.unwrap_err();
    settle().await;
    server_records.clear();
    client_records.clear();
    for _ in 0..ROUNDS {
        let status = client.exchange(NeighborReport::default()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "boom", "the user's error passes through untouched");
    }
    settle().await;
    let requests = server_records.requests();
    assert_eq!(requests.len(), ROUNDS);
    assert!(requests.iter().all(|r| r.error), "{requests:?}");
    let calls = client_records.calls();
    assert_eq!(calls.len(), ROUNDS);
    for call in &calls {
        assert!(call.error);
        assert_eq!(&*call.callee, "svc-grpc", "timing came back with the error");
    }
    assert_near("remote_total", median_of(&calls, |c| c.remote_total.unwrap()), 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_database_call_counts_as_downstream() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (tracer, records) = traced("svc-db-user");
    let database = tracer.dependency("postgres").unwrap();
    let router = Router::new()
        .route(
            "/",
            get(move || {
                let database = database.clone();
                async move {
                    let rows: Result<u32, &str> = database
                        .wrap_result(async {
                            tokio::time::sleep(Duration::from_millis(25)).await;
                            Ok(3)
                        })
                        .await;
                    format!("{rows:?}")
                }
            }),
        )
        .layer(tracer.server_layer());
    let addr = serve_router(router).await;
    drive(addr, &[&records]).await;
    let requests = records.requests();
    assert_eq!(requests.len(), ROUNDS);
    assert_near("downstream", median_of(&requests, |r| r.downstream), 25.0);
    assert!(median_of(&requests, off_cpu) < Duration::from_millis(3), "{requests:?}");
    assert!(requests.iter().all(|r| r.largest_wait.point.service() == "postgres"), "{requests:?}");
    let calls = records.calls();
    assert_eq!(calls.len(), ROUNDS);
    for call in calls {
        assert_eq!(&*call.callee, "postgres");
        assert!(call.critical && !call.error && call.remote_total.is_none(), "{call:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_spawned_tasks_count_when_the_request_is_carried() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (callee_tracer, _) = traced("svc-callee");
    let callee_addr = serve_http(&callee_tracer, Behavior::sleep(20)).await;
    for carried in [true, false] {
        let (tracer, records) = traced("svc-spawner");
        let callee = Callee::http(&tracer, callee_addr);
        let router = Router::new()
            .route(
                "/",
                get(move || {
                    let callee = callee.clone();
                    async move {
                        let work = async move { callee.call().await };
                        let handle = if carried { tokio::spawn(work.in_current_request()) } else { tokio::spawn(work) };
                        handle.await.unwrap();
                        "ok"
                    }
                }),
            )
            .layer(tracer.server_layer());
        let addr = serve_router(router).await;
        drive(addr, &[&records]).await;
        let requests = records.requests();
        assert_eq!(requests.len(), ROUNDS);
        if carried {
            assert_near("downstream (carried)", median_of(&requests, |r| r.downstream), 20.0);
            assert!(median_of(&requests, off_cpu) < Duration::from_millis(3), "carried: {requests:?}");
            assert!(requests.iter().all(|r| r.largest_wait.point.service() == "svc-callee"), "{requests:?}");
        } else {
            assert!(requests.iter().all(|r| r.downstream.is_zero()), "not carried: {requests:?}");
            assert_near("local_wait off the CPU (not carried)", median_of(&requests, off_cpu), 20.0);
        }
        let calls = records.calls();
        assert_eq!(calls.len(), ROUNDS);
        assert!(calls.iter().all(|call| call.critical == carried), "{calls:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_callee_fails_exactly_as_without_rootscale() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let tracer = Tracer::builder("svc-a").build().unwrap();
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let request = || Request::get(format!("http://{closed}/")).body(Empty::<Bytes>::new()).unwrap();
    let bare = plain_client().oneshot(request()).await.unwrap_err();
    let traced = ServiceBuilder::new()
        .layer(tracer.client_layer())
        .service(plain_client())
        .oneshot(request())
        .await
        .unwrap_err();
    assert_eq!(bare.is_connect(), traced.is_connect());
    assert_eq!(bare.to_string(), traced.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timing_is_sent_only_to_instrumented_callers_by_default() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let tracer = Tracer::builder("svc-entry").build().unwrap();
    let addr = serve_http(&tracer, Behavior::default()).await;
    let outside = get_from_outside(&plain_client(), addr).await;
    assert!(outside.headers().get(TIMING_HEADER).is_none(), "an outside client learns nothing");
    let mut request = Request::get(format!("http://{addr}/")).body(Empty::<Bytes>::new()).unwrap();
    request.headers_mut().insert(rootscale_tracer::CALLER_HEADER, http::HeaderValue::from_static("s=svc-neighbour"));
    let inside = plain_client().request(request).await.unwrap();
    let header = inside.headers()[TIMING_HEADER].to_str().unwrap();
    assert!(header.starts_with("v=1;s=svc-entry;t="), "{header}");
}
