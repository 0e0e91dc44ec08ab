//! The inbound side: callers reach the application through the proxy. The tracer's server layer measures each
//! request from its arrival at the proxy to the end of its response — the service's `total`, as a caller one hop
//! closer would see it — checks the caller's `rootscale-caller` and answers with `rootscale-timing`. Before the
//! request goes on to the application it is registered for correlation, until its response ends or is dropped. A
//! protocol switch (a WebSocket handshake) keeps its `Upgrade`; once the application answers 101, the caller's and
//! the application's connections are joined byte for byte.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rootscale_tracer::{CALLER_HEADER, RequestHandle, TraceServer, Tracer};
use tower::{Layer, Service};

use crate::{
    ProxyCounters,
    conn::{self, ProxyBody, Upstream},
    correlate::Correlator,
};

/// The inbound port's service: the tracer's server layer around [`Forward`].
pub fn service(
    tracer: &Tracer,
    app: SocketAddr,
    correlator: Arc<Correlator>,
    counters: Arc<ProxyCounters>,
) -> TraceServer<Forward> {
    tracer.server_layer().layer(Forward { upstream: Upstream::new(), app, correlator, counters })
}

/// Forwards a request to the application.
#[derive(Clone)]
pub struct Forward {
    upstream: Upstream,
    app: SocketAddr,
    correlator: Arc<Correlator>,
    counters: Arc<ProxyCounters>,
}

impl Service<Request<Incoming>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            // Taken here, not in `call`: the server layer runs this future inside the request it measures.
            let registration = this.correlator.register(request.headers_mut(), RequestHandle::current());
            if registration.is_none() {
                ProxyCounters::add(&this.counters.map_full);
            }
            let upgrade = conn::Upgrade::take(&mut request);
            conn::strip_hop_by_hop(request.headers_mut());
            if let Some(upgrade) = &upgrade {
                upgrade.ask(request.headers_mut());
            }
            // The caller's proof is for the proxy, which checked it; the application has no use for it.
            request.headers_mut().remove(CALLER_HEADER);
            let path = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
            match Uri::try_from(format!("http://{}{path}", this.app)) {
                Ok(uri) => *request.uri_mut() = uri,
                Err(_) => return Ok(conn::answer(StatusCode::BAD_REQUEST, "rootscale-proxy: bad request target\n")),
            }
            match this.upstream.client(request.version()).request(request).await {
                Ok(mut response) => {
                    if let Some(upgrade) = upgrade {
                        upgrade.join(&mut response, this.counters.clone());
                    }
                    Ok(response.map(|body| {
                        // The registration lasts as long as the response body: the application may still call out
                        // while it streams.
                        let mut registration = registration;
                        body.map_frame(move |frame| {
                            let _open = &mut registration;
                            frame
                        })
                        .boxed_unsync()
                    }))
                }
                Err(error) => {
                    ProxyCounters::add(&this.counters.upstream_errors);
                    tracing::debug!(%error, app = %this.app, "the application could not be reached");
                    Ok(conn::answer(StatusCode::BAD_GATEWAY, "rootscale-proxy: the application did not answer\n"))
                }
            }
        })
    }
}
