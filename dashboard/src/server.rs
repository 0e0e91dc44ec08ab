//! The dashboard over HTTP: the page (embedded), `GET api/state`, `GET api/stream`. Only `GET` routes exist, so
//! nothing can be changed through it; callers decide where it listens (loopback by default in both binaries).

use std::{convert::Infallible, future::Future, net::SocketAddr, time::Duration};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderValue, header},
    response::{
        IntoResponse, Response,
        sse::{Event as SseEvent, KeepAlive, Sse},
    },
    routing::get,
};
use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};

use crate::state::{Dashboard, StateView, Update};

const INDEX: &str = include_str!("../assets/index.html");
const SCRIPT: &str = include_str!("../assets/app.js");
const STYLE: &str = include_str!("../assets/style.css");

/// Where the page may load anything from: itself only (inline `style` attributes carry the verdict colours).
const CSP: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

async fn state(State(dashboard): State<Dashboard>) -> Json<StateView> {
    Json(dashboard.state())
}

fn sse_event(update: Result<Update, BroadcastStreamRecvError>) -> Option<SseEvent> {
    let (name, data) = match update {
        Ok(Update::Frame(frame)) => ("frame", serde_json::to_string(&*frame)),
        Ok(Update::Event(event)) => ("event", serde_json::to_string(&*event)),
        // The page missed updates: it reloads the whole state.
        Err(BroadcastStreamRecvError::Lagged(_)) => ("resync", Ok(String::new())),
    };
    match data {
        Ok(data) => Some(SseEvent::default().event(name).data(data)),
        Err(error) => {
            tracing::warn!(%error, "could not encode a dashboard update");
            None
        }
    }
}

async fn stream(State(dashboard): State<Dashboard>) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let updates = BroadcastStream::new(dashboard.subscribe()).filter_map(|update| async move { sse_event(update) });
    Sse::new(updates.map(Ok)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The dashboard's routes.
pub fn router(dashboard: Dashboard) -> Router {
    Router::new()
        .route("/", get(|| async { asset(INDEX, "text/html; charset=utf-8") }))
        .route("/app.js", get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/style.css", get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
        .route("/api/state", get(state))
        .route("/api/stream", get(stream))
        .with_state(dashboard)
}

/// Binds `addr` and serves the dashboard until `shutdown` completes; returns the address bound (port 0 picks
/// one) once listening.
pub async fn serve(
    dashboard: Dashboard,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        tracing::warn!(%bound, "the dashboard listens beyond loopback; it is read-only but has no authentication");
    }
    let app = router(dashboard);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!(%error, "the dashboard stopped");
        }
    });
    Ok(bound)
}
