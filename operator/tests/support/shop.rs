//! Real HTTP services with their real agents on loopback, and the stand-in's Deployments and Pods that point at
//! them: what the operator's end-to-end tests run against.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rootscale_tracer::{
    Agent, AgentBuilder,
    identity::{KeyRing, MeshKeys},
};
use serde_json::{Value, json};
use tower::{ServiceBuilder, ServiceExt};

use super::ApiServer;

pub struct Service {
    pub agent: Agent,
    pub addr: SocketAddr,
}

/// The mesh key of the tests' mesh: services prove membership with it, and the operator asks with it.
pub fn mesh_keys() -> Arc<KeyRing> {
    static KEYS: std::sync::OnceLock<Arc<KeyRing>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| Arc::new(KeyRing::fixed(MeshKeys::generate().unwrap()))).clone()
}

/// An HTTP service with its agent (a member of the tests' mesh); each request holds one of `slots` for 20 ms, then
/// calls `callee`.
pub async fn service(name: &str, slots: usize, callee: Option<SocketAddr>) -> Service {
    service_with(Agent::builder(name).mesh_keys(mesh_keys()), slots, callee).await
}

/// The same, with the agent built from `builder` (with TLS, say) on a free loopback port.
pub async fn service_with(builder: AgentBuilder, slots: usize, callee: Option<SocketAddr>) -> Service {
    let agent = builder
        .listen("127.0.0.1:0".parse().unwrap())
        .window(Duration::from_secs(1))
        .concurrency(slots as u32)
        .cpu_cores(1.0)
        .start()
        .await
        .unwrap();
    let pool = Arc::new(tokio::sync::Semaphore::new(slots));
    let client = ServiceBuilder::new()
        .layer(agent.client_layer())
        .service(Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>());
    let app = Router::new()
        .route(
            "/",
            get(move || {
                let (pool, client) = (pool.clone(), client.clone());
                async move {
                    {
                        let _slot = pool.acquire().await.unwrap();
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if let Some(callee) = callee {
                        let request = http::Request::get(format!("http://{callee}/")).body(Empty::new()).unwrap();
                        if let Ok(response) = client.oneshot(request).await {
                            let _ = response.into_body().collect().await;
                        }
                    }
                    "ok"
                }
            }),
        )
        .layer(agent.server_layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Service { agent, addr }
}

/// A Deployment in namespace `shop` managed by rootscale, its agents on `agent_port`, with more annotations.
pub fn deployment(name: &str, agent_port: u16, extra: &[(&str, &str)]) -> Value {
    let mut annotations = json!({"rootscale.dev/enabled": "true", "rootscale.dev/agent-port": agent_port.to_string(),
                                 "rootscale.dev/max-replicas": "10"});
    for (key, value) in extra {
        annotations[format!("rootscale.dev/{key}")] = json!(value);
    }
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": []}}}})
}

/// The Deployment's one ready Pod, on 127.0.0.1.
pub fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": format!("{name}-0"), "namespace": "shop", "labels": {"app": name}},
           "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// Open-loop load on `entry` until `until`.
pub fn load(entry: SocketAddr, rate: f64, until: Instant) {
    tokio::spawn(async move {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        while Instant::now() < until {
            ticks.tick().await;
            let client = client.clone();
            tokio::spawn(async move {
                if let Ok(response) = client.get(format!("http://{entry}/").parse().unwrap()).await {
                    let _ = response.into_body().collect().await;
                }
            });
        }
    });
}

/// The bodies of every patch of `name`'s `/scale`.
pub fn scale_patches(api: &ApiServer, name: &str) -> Vec<Value> {
    let path = format!("/apis/apps/v1/namespaces/shop/deployments/{name}/scale");
    api.log().into_iter().filter(|r| r.method == "PATCH" && r.path.starts_with(&path)).map(|r| r.body).collect()
}
