//! The outbound side: the application's calls go through the proxy — HTTP/1.1 through its HTTP proxy port
//! (`HTTP_PROXY`), HTTP/2 and gRPC through the same port routed by `:authority`, or through a local port given to
//! one callee — each named by [`Routes`](crate::Routes) and measured by the tracer's client layer — `client_total`, `remote_total`,
//! `net_wait` and the callee's `remote_wait` — inside the inbound request its trace context names, so the call
//! counts toward that request's critical path as it would in a linked service. A protocol switch (101) is joined
//! byte for byte once answered; a `CONNECT` is tunnelled to the callee's port, unmeasured.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use http::{Method, Request, Response, StatusCode, Uri, Version, header, uri::Authority};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use rootscale_tracer::{ClientLayer, RequestHandle, TraceClient, Tracer};
use tower::{Layer, Service, ServiceExt};

use crate::{
    ProxyCounters,
    config::{MAX_ROUTES, Route, Routes},
    conn::{self, ProxyBody, Upstream},
    correlate::{Correlator, Lookup},
};

type Measured = TraceClient<Client<HttpConnector, Incoming>>;

/// What the outbound ports share.
pub struct Shared {
    routes: Routes,
    clients: Clients,
    correlator: Arc<Correlator>,
    counters: Arc<ProxyCounters>,
    /// The proxy's own ports: a call to one of them would loop.
    own: Vec<SocketAddr>,
}

impl Shared {
    pub fn new(
        tracer: &Tracer,
        routes: Routes,
        correlator: Arc<Correlator>,
        counters: Arc<ProxyCounters>,
        own: Vec<SocketAddr>,
    ) -> Arc<Self> {
        // A call whose trace context names no inbound request is still made for one: counted as untied, so the
        // decision estimates the service's own wait for the window (docs/DESIGN.md §1.8).
        let clients = Clients {
            untied: tracer.client_layer().untied_calls(),
            tied: tracer.client_layer(),
            upstream: Upstream::new(),
            named: Mutex::default(),
        };
        Arc::new(Self { routes, clients, correlator, counters, own })
    }
}

/// The HTTP proxy port's service: each call goes where its target's authority says.
pub fn service(shared: Arc<Shared>) -> Forward {
    Forward { shared, fixed: None }
}

/// A callee's own local port: every call goes to the route named `name`.
pub fn callee_service(shared: Arc<Shared>, name: &str) -> Option<Forward> {
    let route = shared.routes.get(name)?;
    Some(Forward { shared, fixed: Some(route) })
}

/// A measured client per callee name, protocol and tie, made once each (at most [`MAX_ROUTES`] names; past that,
/// calls are named after their authority).
struct Clients {
    /// For calls that may be for a request that could not be named: outside a request, they count as untied.
    untied: ClientLayer,
    /// For calls tied to a request, or named as after theirs.
    tied: ClientLayer,
    upstream: Upstream,
    named: Mutex<HashMap<(String, bool, bool), Measured>>,
}

impl Clients {
    fn get(&self, name: Option<&str>, version: Version, untied: bool) -> Measured {
        let client = self.upstream.client(version).clone();
        let base = if untied { &self.untied } else { &self.tied };
        let Some(name) = name else { return base.layer(client) };
        let key = (name.to_string(), version == Version::HTTP_2, untied);
        let mut named = self.named.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(measured) = named.get(&key) {
            return measured.clone();
        }
        let Ok(layer) = base.clone().callee(name) else { return base.layer(client) };
        let measured = layer.layer(client);
        if named.len() < 4 * MAX_ROUTES {
            named.insert(key, measured.clone());
        }
        measured
    }
}

/// Forwards one of the application's calls.
#[derive(Clone)]
pub struct Forward {
    shared: Arc<Shared>,
    /// A callee's own port: where every call goes.
    fixed: Option<Route>,
}

/// Where a proxied request is going: the authority of its absolute-form target, or its `Host`.
fn target(request: &Request<Incoming>) -> Option<Authority> {
    if let Some(authority) = request.uri().authority() {
        return Some(authority.clone());
    }
    request.headers().get(header::HOST)?.to_str().ok()?.parse().ok()
}

impl Service<Request<Incoming>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let (this, fixed) = (self.shared.clone(), self.fixed.clone());
        Box::pin(async move {
            let route = match (fixed, target(&request)) {
                (Some(route), _) => route,
                (None, Some(authority)) => this.routes.resolve(&authority),
                (None, None) => {
                    ProxyCounters::add(&this.counters.refused);
                    return Ok(conn::answer(StatusCode::BAD_REQUEST, "rootscale-proxy: the request names no host\n"));
                }
            };
            let upstream_port = route.upstream.port_u16().unwrap_or(80);
            let loops = this.own.iter().any(|own| {
                own.port() == upstream_port
                    && route
                        .upstream
                        .host()
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip == own.ip() || ip.is_loopback() && own.ip().is_unspecified())
            });
            if loops {
                ProxyCounters::add(&this.counters.refused);
                return Ok(conn::answer(StatusCode::LOOP_DETECTED, "rootscale-proxy: the call would loop\n"));
            }
            if request.method() == Method::CONNECT {
                return Ok(tunnel(request, &route.upstream, this.counters.clone()).await);
            }
            // Outside any request (`RequestHandle::current()` here is none), a call is untied — made for a request
            // that could not be named — unless it names one that has ended, whose wait it can no longer be in.
            let (request_handle, untied) = match this.correlator.find(request.headers_mut()) {
                Lookup::Found(handle) => {
                    ProxyCounters::add(&this.counters.correlated);
                    (handle, false)
                }
                Lookup::Ambiguous => {
                    ProxyCounters::add(&this.counters.ambiguous);
                    (RequestHandle::current(), true)
                }
                Lookup::Unknown => {
                    ProxyCounters::add(&this.counters.uncorrelated);
                    (RequestHandle::current(), true)
                }
                Lookup::Ended => {
                    ProxyCounters::add(&this.counters.after_request);
                    (RequestHandle::current(), false)
                }
            };
            let upgrade = conn::Upgrade::take(&mut request);
            conn::strip_hop_by_hop(request.headers_mut());
            if let Some(upgrade) = &upgrade {
                upgrade.ask(request.headers_mut());
            }
            let path = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
            match Uri::try_from(format!("http://{}{path}", route.upstream)) {
                Ok(uri) => *request.uri_mut() = uri,
                Err(_) => return Ok(conn::answer(StatusCode::BAD_REQUEST, "rootscale-proxy: bad request target\n")),
            }
            let client = this.clients.get(route.name.as_deref(), request.version(), untied);
            match request_handle.scope(client.oneshot(request)).await {
                Ok(mut response) => {
                    if let Some(upgrade) = upgrade {
                        upgrade.join(&mut response, this.counters.clone());
                    }
                    Ok(response.map(|body| body.boxed_unsync()))
                }
                Err(error) => {
                    ProxyCounters::add(&this.counters.upstream_errors);
                    tracing::debug!(%error, upstream = %route.upstream, "a callee could not be reached");
                    Ok(conn::answer(StatusCode::BAD_GATEWAY, "rootscale-proxy: the callee did not answer\n"))
                }
            }
        })
    }
}

/// A `CONNECT` (an `HTTPS_PROXY` client's TLS, a WebSocket client behind a proxy): the callee's port is dialled,
/// then the caller is answered 200 and its connection joined to the callee's byte for byte, counted and not
/// measured — what crosses it is opaque. A callee that cannot be reached is a 502, as for any call.
async fn tunnel(request: Request<Incoming>, upstream: &Authority, counters: Arc<ProxyCounters>) -> Response<ProxyBody> {
    let target = upstream.to_string();
    let callee = match tokio::net::TcpStream::connect(&target).await {
        Ok(callee) => callee,
        Err(error) => {
            ProxyCounters::add(&counters.upstream_errors);
            tracing::debug!(%error, %target, "a tunnel's callee could not be reached");
            return conn::answer(StatusCode::BAD_GATEWAY, "rootscale-proxy: the callee did not answer\n");
        }
    };
    let _ = callee.set_nodelay(true);
    let caller = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let caller = match caller.await {
            Ok(caller) => caller,
            Err(error) => {
                tracing::debug!(%error, "a CONNECT did not switch");
                return;
            }
        };
        ProxyCounters::add(&counters.tunnels);
        conn::join(hyper_util::rt::TokioIo::new(caller), callee, &format!("a tunnel to {target}")).await;
    });
    conn::answer(StatusCode::OK, "")
}
