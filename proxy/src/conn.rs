//! Serving one port — HTTP/1.1, or HTTP/2 with prior knowledge (gRPC), told apart by the connection's first
//! bytes; on the inbound port, anything else is passed to the application byte for byte — and what the inbound and
//! outbound sides share: the body type, the clients they forward with, hop-by-hop headers, and the answer when the
//! other side cannot be reached.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::net::{TcpListener, TcpStream};
use tower::Service;

use crate::ProxyCounters;

/// How long a new connection may stay silent before the proxy asks the application whether it speaks first (a
/// greeting protocol: then the connection is passed through). An HTTP client may stay silent much longer — a
/// connection pool opens connections ahead of its requests — and an HTTP application never speaks first, so
/// such a connection is served as HTTP whenever its request comes.
pub const FIRST_BYTES_WITHIN: Duration = Duration::from_millis(500);
/// What an HTTP connection starts with: a request line's method and its space, or HTTP/2's preface.
const HTTP_STARTS: [&[u8]; 10] =
    [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"CONNECT ", b"PRI * HTTP/2"];
/// The longest of those.
const LONGEST_START: usize = 12;

/// What a connection's first bytes say it speaks.
#[derive(Debug, PartialEq, Eq)]
enum Opening {
    Http,
    Other,
    /// Too few bytes yet to tell.
    Unsure,
}

fn opening(first: &[u8]) -> Opening {
    for start in HTTP_STARTS {
        let n = first.len().min(start.len());
        if first[..n] == start[..n] {
            return if n == start.len() { Opening::Http } else { Opening::Unsure };
        }
    }
    Opening::Other
}

/// Waits for a connection's first bytes, without taking them, and says what they open.
async fn first_bytes(stream: &TcpStream) -> Opening {
    let mut first = [0u8; LONGEST_START];
    loop {
        match stream.peek(&mut first).await {
            // Closed before a byte: hyper will see the same and end quietly.
            Ok(0) | Err(_) => return Opening::Http,
            Ok(n) => match opening(&first[..n]) {
                Opening::Unsure => tokio::time::sleep(Duration::from_millis(1)).await,
                // A request line split across segments: the rest is on its way.
                decided => return decided,
            },
        }
    }
}

/// What to do with a new connection on a port that passes other protocols through.
enum Route {
    Http,
    /// Not HTTP: pass it to the application, on this connection to it if one is open already.
    Splice(Option<TcpStream>),
}

/// Tells HTTP from other protocols: by the client's first bytes; or, when the client stays silent past
/// [`FIRST_BYTES_WITHIN`], by whichever side speaks first — an application that greets is not HTTP.
async fn route(stream: &TcpStream, app: SocketAddr) -> Route {
    let decided = |opening| if opening == Opening::Other { Route::Splice(None) } else { Route::Http };
    if let Ok(opening) = tokio::time::timeout(FIRST_BYTES_WITHIN, first_bytes(stream)).await {
        return decided(opening);
    }
    let Ok(app_side) = TcpStream::connect(app).await else {
        // Nobody to greet: whatever the client sends is served as HTTP (a 502 if the application stays away).
        return decided(first_bytes(stream).await);
    };
    let mut greeting = [0u8; 1];
    tokio::select! {
        opening = first_bytes(stream) => match opening {
            Opening::Other => Route::Splice(Some(app_side)),
            _ => Route::Http,
        },
        greeted = app_side.peek(&mut greeting) => match greeted {
            Ok(n) if n > 0 => Route::Splice(Some(app_side)),
            // The application hung up without a word: the client decides.
            _ => decided(first_bytes(stream).await),
        },
    }
}

/// Where a port sends connections that do not speak HTTP: the application, byte for byte, counted.
#[derive(Clone)]
pub struct Passthrough {
    pub app: SocketAddr,
    pub counters: Arc<ProxyCounters>,
}

impl Passthrough {
    async fn splice(&self, stream: TcpStream, app: Option<TcpStream>, peer: SocketAddr) {
        ProxyCounters::add(&self.counters.passthrough);
        let connected = match app {
            Some(app) => Ok(app),
            None => TcpStream::connect(self.app).await,
        };
        let app = match connected {
            Ok(app) => app,
            Err(error) => {
                ProxyCounters::add(&self.counters.upstream_errors);
                tracing::debug!(%peer, %error, "the application could not be reached for a connection passed through");
                return;
            }
        };
        let _ = app.set_nodelay(true);
        join(stream, app, &format!("a connection from {peer} passed through")).await;
    }
}

/// Joins two connections byte for byte until either side closes; `what` names them in the log.
pub async fn join<A, B>(mut a: A, mut b: B, what: &str)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(error) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
        tracing::debug!(%error, "{what} ended with an error");
    }
}

/// A body passed through the proxy.
pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// The clients the proxy forwards with, one per protocol: a request goes on in the version it came in.
#[derive(Clone)]
pub struct Upstream {
    http1: Client<HttpConnector, Incoming>,
    http2: Client<HttpConnector, Incoming>,
}

impl Upstream {
    /// Pooled keep-alive connections with `TCP_NODELAY` (a response's last bytes must not wait out a delayed ACK,
    /// which callers would measure as network time).
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http1 = Client::builder(TokioExecutor::new()).build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new()).http2_only(true).build(connector);
        Self { http1, http2 }
    }

    /// The client for `version`.
    pub fn client(&self, version: Version) -> &Client<HttpConnector, Incoming> {
        if version == Version::HTTP_2 { &self.http2 } else { &self.http1 }
    }
}

/// Accepts connections on `listener` and serves each with `service`, until the task is aborted; with
/// `passthrough`, a connection that does not speak HTTP goes there instead.
pub async fn serve<S, B>(listener: TcpListener, service: S, passthrough: Option<Passthrough>)
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(service.clone());
        let passthrough = passthrough.clone();
        tokio::spawn(async move {
            if let Some(passthrough) = passthrough
                && let Route::Splice(app) = route(&stream, passthrough.app).await
            {
                passthrough.splice(stream, app, peer).await;
                return;
            }
            let builder = auto::Builder::new(TokioExecutor::new());
            // With upgrades: a WebSocket handshake or a CONNECT hands the connection over once answered.
            if let Err(error) = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

/// A request's ask to switch protocols (HTTP/1.1 `Connection: upgrade` with `Upgrade`, as a WebSocket handshake
/// sends): its `Upgrade` header and the caller's side of the connection, once it has switched.
pub struct Upgrade {
    protocol: HeaderValue,
    caller: hyper::upgrade::OnUpgrade,
}

impl Upgrade {
    /// Takes the ask from `request`, if it makes one.
    pub fn take<B>(request: &mut Request<B>) -> Option<Self> {
        if request.version() != Version::HTTP_11 {
            return None;
        }
        let asks = request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
        let protocol = request.headers().get(header::UPGRADE)?.clone();
        asks.then(|| Self { protocol, caller: hyper::upgrade::on(request) })
    }

    /// Puts the ask back on the request going on (hop-by-hop headers were stripped from it).
    pub fn ask(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
    }

    /// If the upstream agreed (101), joins the two connections once both have switched, byte for byte, counted.
    pub fn join<B>(self, response: &mut Response<B>, counters: Arc<ProxyCounters>) {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        let upstream = hyper::upgrade::on(response);
        tokio::spawn(async move {
            let (caller, upstream) = match tokio::try_join!(self.caller, upstream) {
                Ok(both) => both,
                Err(error) => {
                    tracing::debug!(%error, "an upgraded connection did not switch");
                    return;
                }
            };
            ProxyCounters::add(&counters.upgraded);
            join(TokioIo::new(caller), TokioIo::new(upstream), "an upgraded connection").await;
        });
    }
}

/// Headers that belong to one connection, not to the request: never forwarded.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        header::CONNECTION.as_str(),
        "keep-alive",
        "proxy-connection",
        header::PROXY_AUTHORIZATION.as_str(),
        header::TE.as_str(),
        header::TRAILER.as_str(),
        header::TRANSFER_ENCODING.as_str(),
        header::UPGRADE.as_str(),
    ] {
        headers.remove(name);
    }
}

/// An answer of the proxy's own (the upstream could not be reached, the request named nowhere to go).
pub fn answer(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let body =
        Full::new(Bytes::from_static(text.as_bytes())).map_err(|never: Infallible| match never {}).boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_told_from_other_protocols_by_its_first_bytes() {
        for http in
            [&b"GET / HTTP/1.1\r\n"[..], b"POST /x HTTP/1.1", b"PRI * HTTP/2.0\r\n\r\nSM", b"OPTIONS * HTTP/1.1"]
        {
            assert_eq!(opening(http), Opening::Http, "{:?}", String::from_utf8_lossy(http));
        }
        for unsure in [&b"G"[..], b"GE", b"PRI * HT", b"DELE"] {
            assert_eq!(opening(unsure), Opening::Unsure, "{:?}", String::from_utf8_lossy(unsure));
        }
        // TLS's ClientHello, Redis, a PostgreSQL startup message, a method without its space, lower case.
        for other in
            [&b"\x16\x03\x01\x02\x00"[..], b"*1\r\n$4\r\nPING", b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"GETX", b"get /"]
        {
            assert_eq!(opening(other), Opening::Other, "{other:?}");
        }
    }
}
