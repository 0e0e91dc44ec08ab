//! An in-process stand-in of the Kubernetes API, over real HTTP, for the operator's tests only. It keeps objects
//! in memory with a resourceVersion counter and serves what the operator uses: list and watch (from a
//! resourceVersion), get, merge and server-side-apply patches, the `/scale` and `/status` subresources, Events
//! and Leases, with 409 Conflict on a stale resourceVersion. Every request is logged so tests can check what the
//! operator did. It is no API server: no validation, no admission, no field ownership.
#![allow(dead_code)]

pub mod advisor;
pub mod shop;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{Method, StatusCode},
    response::{IntoResponse, Response},
};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// One request the stand-in served.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub body: Value,
    /// The client that sent it ([`ApiServer::client_as`]; empty for [`ApiServer::client`]).
    pub client: String,
    pub at: std::time::Instant,
}

/// The header a named client sends, so the stand-in can tell clients apart.
const CLIENT_HEADER: &str = "x-standin-client";

#[derive(Default)]
struct Store {
    version: u64,
    /// By "resource/namespace/name".
    objects: BTreeMap<String, Value>,
    /// Every change: (resourceVersion, resource, watch event type, object).
    changes: Vec<(u64, String, &'static str, Value)>,
    log: Vec<Logged>,
    /// Requests from a client (by name) whose path contains a fragment are answered 503: a partial partition.
    cut: BTreeMap<String, String>,
}

#[derive(Clone)]
pub struct ApiServer {
    store: Arc<Mutex<Store>>,
    changed: broadcast::Sender<u64>,
    pub addr: SocketAddr,
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), axum::Json(body)).into_response()
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

/// (resource, namespace, name, subresource)
type Target = (String, Option<String>, Option<String>, Option<String>);

/// `/api/v1/...` or `/apis/<group>/<version>/...`.
fn parse(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let rest = match *parts.first()? {
        "api" => parts.get(2..)?,
        "apis" => parts.get(3..)?,
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => (Some(namespace.to_string()), rest),
        rest => (None, rest),
    };
    let resource = rest.first()?.to_string();
    Some((resource, namespace, rest.get(1).map(|s| s.to_string()), rest.get(2).map(|s| s.to_string())))
}

/// Whether `object`'s labels match a label selector as the API server reads one: terms joined by commas, each
/// `key=value` (or `==`), `key!=value`, `key in (a,b)`, `key notin (a,b)`, `key` (exists) or `!key` (does not).
pub fn matches_selector(object: &Value, selector: &str) -> bool {
    let labels = &object["metadata"]["labels"];
    let label = |key: &str| labels[key.trim()].as_str();
    let set = |values: &str| -> Vec<String> {
        values.trim().trim_start_matches('(').trim_end_matches(')').split(',').map(|v| v.trim().to_string()).collect()
    };
    terms(selector).iter().all(|term| {
        let term = term.trim();
        if let Some((key, values)) = term.split_once(" notin ") {
            return label(key).is_none_or(|value| !set(values).iter().any(|v| v == value));
        }
        if let Some((key, values)) = term.split_once(" in ") {
            return label(key).is_some_and(|value| set(values).iter().any(|v| v == value));
        }
        if let Some((key, value)) = term.split_once("!=") {
            return label(key) != Some(value.trim());
        }
        if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            return label(key) == Some(value.trim());
        }
        match term.strip_prefix('!') {
            Some(key) => label(key).is_none(),
            None => label(term).is_some(),
        }
    })
}

/// A selector's terms: split at commas outside parentheses.
fn terms(selector: &str) -> Vec<String> {
    let (mut terms, mut current, mut depth) = (Vec::new(), String::new(), 0);
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    terms.push(current);
    terms.into_iter().filter(|term| !term.trim().is_empty()).collect()
}

/// A query string's parameters, percent-decoded (`+` is a space).
fn query(uri: &axum::http::Uri) -> BTreeMap<String, String> {
    let decode = |text: &str| -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = bytes.get(i + 1..i + 3).and_then(|hex| std::str::from_utf8(hex).ok());
            match (bytes[i], hex.and_then(|hex| u8::from_str_radix(hex, 16).ok())) {
                (b'%', Some(byte)) => {
                    out.push(byte);
                    i += 3;
                }
                (b'+', _) => {
                    out.push(b' ');
                    i += 1;
                }
                (byte, _) => {
                    out.push(byte);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

impl ApiServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (changed, _) = broadcast::channel(1024);
        let server = Self { store: Arc::default(), changed, addr };
        let app = Router::new().fallback(handle).with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        server
    }

    /// A kube client for this stand-in.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// A kube client for this stand-in whose requests carry `name`: logged with it, and cut off with [`ApiServer::cut`].
    pub fn client_as(&self, name: &str) -> kube::Client {
        let mut config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        config.headers.push((http::HeaderName::from_static(CLIENT_HEADER), name.parse().unwrap()));
        config.default_retry = false;
        kube::Client::try_from(config).unwrap()
    }

    /// From now on, requests from client `name` whose path contains `fragment` get 503 (a partition of those
    /// requests; the others still pass).
    pub fn cut(&self, name: &str, fragment: &str) {
        self.store.lock().unwrap().cut.insert(name.to_string(), fragment.to_string());
    }

    /// Stores an object (as `kubectl apply` would create it).
    pub fn create(&self, resource: &str, mut object: Value) {
        let mut store = self.store.lock().unwrap();
        store.version += 1;
        let version = store.version;
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or("").to_string();
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{resource}-{name}"));
        }
        object["metadata"]["creationTimestamp"] = json!("2026-11-27T00:00:00Z");
        store.objects.insert(format!("{resource}/{namespace}/{name}"), object.clone());
        store.changes.push((version, resource.to_string(), "ADDED", object));
        drop(store);
        let _ = self.changed.send(version);
    }

    /// Sets a pod's Ready condition (as the kubelet would), announced to watches as a change.
    pub fn set_pod_ready(&self, namespace: &str, name: &str, ready: bool) {
        let key = format!("pods/{namespace}/{name}");
        let Some(mut pod) = self.get("pods", namespace, name) else { return };
        let status = if ready { "True" } else { "False" };
        pod["status"]["conditions"] = json!([{"type": "Ready", "status": status,
                                              "lastTransitionTime": "2026-11-27T00:00:00Z"}]);
        self.write(key, "pods", "MODIFIED", pod);
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.store.lock().unwrap().objects.get(&format!("{resource}/{namespace}/{name}")).cloned()
    }

    pub fn list(&self, resource: &str) -> Vec<Value> {
        let prefix = format!("{resource}/");
        self.store
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every request served so far.
    pub fn log(&self) -> Vec<Logged> {
        self.store.lock().unwrap().log.clone()
    }

    fn write(&self, key: String, resource: &str, kind: &'static str, mut object: Value) -> Value {
        let mut store = self.store.lock().unwrap();
        store.version += 1;
        let version = store.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        store.objects.insert(key, object.clone());
        store.changes.push((version, resource.to_string(), kind, object.clone()));
        drop(store);
        let _ = self.changed.send(version);
        object
    }
}

async fn handle(State(api): State<ApiServer>, request: Request) -> Response {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let content_type =
        request.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let client = request.headers().get(CLIENT_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let bytes: Bytes = axum::body::to_bytes(request.into_body(), 1 << 20).await.unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let path = uri.path().to_string();
    {
        let mut store = api.store.lock().unwrap();
        if store.cut.get(&client).is_some_and(|fragment| path.contains(fragment.as_str())) {
            return status(503, "ServiceUnavailable", "partitioned");
        }
        store.log.push(Logged {
            method: method.to_string(),
            path: uri.to_string(),
            body: body.clone(),
            client,
            at: std::time::Instant::now(),
        });
    }
    let Some((resource, namespace, name, subresource)) = parse(&path) else {
        return status(404, "NotFound", "no such path");
    };
    let params = query(&uri);
    let ns = namespace.clone().unwrap_or_default();
    match (method, name, subresource.as_deref()) {
        (Method::GET, None, _) if params.get("watch").map(String::as_str) == Some("true") => {
            let since: u64 = params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            watch(api, resource, namespace, since)
        }
        (Method::GET, None, _) => {
            let selector = params.get("labelSelector").cloned().unwrap_or_default();
            let store = api.store.lock().unwrap();
            let items: Vec<Value> = store
                .objects
                .iter()
                .filter(|(key, _)| key.starts_with(&format!("{resource}/")))
                .filter(|(key, _)| namespace.as_ref().is_none_or(|ns| key.starts_with(&format!("{resource}/{ns}/"))))
                .map(|(_, object)| object.clone())
                .filter(|object| matches_selector(object, &selector))
                .collect();
            let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": store.version.to_string()}, "items": items});
            axum::Json(list).into_response()
        }
        (Method::POST, None, _) => {
            let mut object = body;
            let name = object["metadata"]["name"].as_str().map(str::to_string).unwrap_or_else(|| {
                format!(
                    "{}{}",
                    object["metadata"]["generateName"].as_str().unwrap_or("object-"),
                    api.store.lock().unwrap().version
                )
            });
            let key = format!("{resource}/{ns}/{name}");
            if api.store.lock().unwrap().objects.contains_key(&key) {
                return status(409, "AlreadyExists", "already exists");
            }
            object["metadata"]["name"] = json!(name);
            object["metadata"]["namespace"] = json!(ns);
            (StatusCode::CREATED, axum::Json(api.write(key, &resource, "ADDED", object))).into_response()
        }
        (Method::GET, Some(name), sub) => {
            let Some(object) = api.get(&resource, &ns, &name) else { return status(404, "NotFound", "not found") };
            match sub {
                Some("scale") => axum::Json(scale_of(&object)).into_response(),
                _ => axum::Json(object).into_response(),
            }
        }
        (Method::PUT, Some(name), _) => {
            let key = format!("{resource}/{ns}/{name}");
            let Some(existing) = api.get(&resource, &ns, &name) else { return status(404, "NotFound", "not found") };
            if let Some(expected) = body["metadata"]["resourceVersion"].as_str()
                && existing["metadata"]["resourceVersion"].as_str() != Some(expected)
            {
                return status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version",
                );
            }
            axum::Json(api.write(key, &resource, "MODIFIED", body)).into_response()
        }
        (Method::PATCH, Some(name), sub) => {
            let key = format!("{resource}/{ns}/{name}");
            let existing = api.get(&resource, &ns, &name);
            let apply = content_type.starts_with("application/apply-patch");
            if let (Some(existing), Some(expected)) = (&existing, body["metadata"]["resourceVersion"].as_str())
                && existing["metadata"]["resourceVersion"].as_str() != Some(expected)
            {
                return status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version",
                );
            }
            let mut object = match existing {
                Some(object) => object,
                None if apply && sub.is_none() => {
                    let mut object = json!({"metadata": {"name": name, "namespace": ns, "uid": format!("uid-{resource}-{name}"),
                                                          "creationTimestamp": "2026-11-27T00:00:00Z"}});
                    merge(&mut object, &json!({"apiVersion": body["apiVersion"], "kind": body["kind"]}));
                    object
                }
                None => return status(404, "NotFound", "not found"),
            };
            match sub {
                Some("scale") => {
                    let replicas = body["spec"]["replicas"].clone();
                    merge(&mut object, &json!({"spec": {"replicas": replicas}}));
                    let object = api.write(key, &resource, "MODIFIED", object);
                    axum::Json(scale_of(&object)).into_response()
                }
                Some("status") => {
                    merge(&mut object, &json!({"status": body["status"]}));
                    axum::Json(api.write(key, &resource, "MODIFIED", object)).into_response()
                }
                _ => {
                    let mut patch = body.clone();
                    if apply {
                        // An apply owns what it sends; status goes through its subresource.
                        if let Some(patch) = patch.as_object_mut() {
                            patch.remove("status");
                        }
                    }
                    merge(&mut object, &patch);
                    axum::Json(api.write(key, &resource, "MODIFIED", object)).into_response()
                }
            }
        }
        _ => status(405, "MethodNotAllowed", "not supported by the stand-in"),
    }
}

fn scale_of(deployment: &Value) -> Value {
    let replicas = deployment["spec"]["replicas"].clone();
    json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
           "metadata": {"name": deployment["metadata"]["name"], "namespace": deployment["metadata"]["namespace"],
                        "resourceVersion": deployment["metadata"]["resourceVersion"]},
           "spec": {"replicas": replicas}, "status": {"replicas": replicas}})
}

/// A watch: every change after `since`, then each new one as it happens, as newline-delimited JSON.
fn watch(api: ApiServer, resource: String, namespace: Option<String>, since: u64) -> Response {
    let mut changes = api.changed.subscribe();
    let stream = async_stream(move |sender: tokio::sync::mpsc::UnboundedSender<Bytes>| async move {
        let mut sent = since;
        loop {
            let pending: Vec<(u64, Value)> = {
                let store = api.store.lock().unwrap();
                store
                    .changes
                    .iter()
                    .filter(|(version, kind, _, object)| {
                        *version > sent
                            && *kind == resource
                            && namespace.as_ref().is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
                    })
                    .map(|(version, _, kind, object)| (*version, json!({"type": kind, "object": object})))
                    .collect()
            };
            for (version, event) in pending {
                let mut line = serde_json::to_vec(&event).unwrap_or_default();
                line.push(b'\n');
                if sender.send(Bytes::from(line)).is_err() {
                    return;
                }
                sent = version;
            }
            if changes.recv().await.is_err() {
                return;
            }
        }
    });
    Response::builder().header("content-type", "application/json").body(stream).unwrap_or_default()
}

/// A streaming body fed by a task.
fn async_stream<F, Fut>(producer: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(producer(sender));
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|bytes| (Ok::<_, std::convert::Infallible>(bytes), receiver))
    });
    Body::from_stream(stream.boxed())
}
