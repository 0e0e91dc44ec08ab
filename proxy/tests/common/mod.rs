//! What the proxy's tests share: services' records, medians and stated tolerances, agents on loopback with a mesh
//! key, and a proxy whose ports are all on loopback.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use rootscale_proxy::{Proxy, ProxyConfig, Routes};
use rootscale_tracer::{Agent, CallRecord, Observer, RequestRecord, identity::KeyRing};
use tokio::net::TcpListener;

#[derive(Default)]
pub struct Records {
    pub requests: Mutex<Vec<RequestRecord>>,
    pub calls: Mutex<Vec<CallRecord>>,
}

impl Observer for Records {
    fn on_request(&self, record: &RequestRecord) {
        self.requests.lock().unwrap().push(record.clone());
    }
    fn on_call(&self, record: &CallRecord) {
        self.calls.lock().unwrap().push(record.clone());
    }
}

pub fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// Tests that time a request or compare latencies take this first, so that within their binary they run one at a
/// time and none measures another's load.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn assert_near(what: &str, measured: Duration, expected: Duration) {
    assert!(
        measured + Duration::from_millis(1) >= expected && measured <= expected + Duration::from_millis(10),
        "{what}: {measured:?}, expected {expected:?} −1/+10 ms"
    );
}

pub async fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

pub async fn agent(service: &str, keys: &Arc<KeyRing>, slo: bool, records: Option<Arc<Records>>) -> Agent {
    let mut builder = Agent::builder(service)
        .listen("127.0.0.1:0".parse().unwrap())
        .window(Duration::from_secs(1))
        .mesh_keys(keys.clone())
        .exchange_timeout(Duration::from_millis(500));
    if slo {
        builder = builder.slo(Duration::from_millis(50), 95.0);
    }
    if let Some(records) = records {
        builder = builder.observer(records);
    }
    builder.start().await.unwrap()
}

/// A proxy for `service`'s application at `app`, every port on loopback, with `routes`.
pub async fn proxy(agent: &Agent, app: SocketAddr, routes: Routes, callee_ports: &[&str]) -> Proxy {
    let mut config = ProxyConfig::new(app);
    config.inbound = "127.0.0.1:0".parse().unwrap();
    config.outbound = "127.0.0.1:0".parse().unwrap();
    config.routes = routes;
    for name in callee_ports {
        config.callee_ports.insert(name.to_string(), "127.0.0.1:0".parse().unwrap());
    }
    Proxy::start(&config, agent).await.unwrap()
}

/// A linked Rust service on loopback: each request holds one of `pool` workers for `work`, then calls each of
/// `callees` in turn (name, address) through the client layer. Answers 502 when a callee failed.
pub async fn rust_service(
    agent: &Agent,
    pool: usize,
    work: Duration,
    callees: Vec<(String, SocketAddr)>,
) -> SocketAddr {
    use axum::{Router, http::StatusCode, routing::get};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    use tower::{Layer, ServiceExt};

    let workers = Arc::new(tokio::sync::Semaphore::new(pool));
    let clients: Vec<_> = callees
        .into_iter()
        .map(|(name, addr)| {
            let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
            (agent.client_layer().callee(&name).unwrap().layer(client), format!("http://{addr}/"))
        })
        .collect();
    let handler = move || {
        let (workers, clients) = (workers.clone(), clients.clone());
        async move {
            {
                let _worker = workers.acquire().await.map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
                tokio::time::sleep(work).await;
            }
            for (client, uri) in clients {
                let request = http::Request::get(uri).body(Empty::new()).map_err(|_| StatusCode::BAD_GATEWAY)?;
                let response = client.oneshot(request).await.map_err(|_| StatusCode::BAD_GATEWAY)?;
                let ok = response.status() == StatusCode::OK;
                response.into_body().collect().await.map_err(|_| StatusCode::BAD_GATEWAY)?;
                if !ok {
                    return Err(StatusCode::BAD_GATEWAY);
                }
            }
            Ok::<_, StatusCode>("ok")
        }
    };
    let (listener, addr) = listen().await;
    let app = Router::new().route("/", get(handler)).layer(agent.server_layer());
    tokio::spawn(axum::serve(listener, app).into_future());
    addr
}
