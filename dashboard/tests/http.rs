//! The dashboard over real HTTP: the embedded page, the state, the live stream, and nothing writable.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rootscale_dashboard::{Dashboard, Event, EventKind, Frame, ServiceView, server};

async fn start() -> (Dashboard, SocketAddr) {
    let dashboard = Dashboard::new("test", "local");
    let addr = server::serve(dashboard.clone(), "127.0.0.1:0".parse().unwrap(), std::future::pending()).await.unwrap();
    (dashboard, addr)
}

async fn request(method: &str, uri: String) -> (u16, String, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let request = http::Request::builder().method(method).uri(uri).body(Empty::new()).unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, content_type, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_from_the_binary_without_anything_external() {
    let (_, addr) = start().await;
    let (status, content_type, page) = request("GET", format!("http://{addr}/")).await;
    assert_eq!((status, content_type.as_str()), (200, "text/html; charset=utf-8"));
    assert!(page.contains("app.js") && page.contains("style.css"));
    for (path, kind) in [("app.js", "text/javascript"), ("style.css", "text/css")] {
        let (status, content_type, body) = request("GET", format!("http://{addr}/{path}")).await;
        assert_eq!(status, 200);
        assert!(content_type.starts_with(kind));
        // No CDN, no external fonts: nothing is fetched from anywhere but this server.
        assert!(!body.contains("http://") && !body.contains("https://"), "{path} refers outside");
    }
    assert!(!page.contains("https://"));
}

#[tokio::test]
async fn state_and_live_updates() {
    let (dashboard, addr) = start().await;
    let db = ServiceView { name: "db".into(), verdict: "root-cause".into(), ..ServiceView::default() };
    dashboard.publish(Frame::new(vec![db], vec![], vec!["db".into()]));
    let (status, _, body) = request("GET", format!("http://{addr}/api/state")).await;
    assert_eq!(status, 200);
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["frames"][0]["services"][0]["verdict"], "root-cause");

    // The stream: open it, then publish, and read the event as it arrives.
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client.get(format!("http://{addr}/api/stream").parse().unwrap()).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    tokio::time::sleep(Duration::from_millis(50)).await;
    dashboard.record(Event::new(EventKind::Scale, "db", "db 1 -> 3", "root cause"));
    let mut seen = String::new();
    while !seen.contains("\n\n") {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.unwrap().unwrap().unwrap();
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(seen.starts_with("event: event\ndata: "), "{seen}");
    assert!(seen.contains("\"text\":\"db 1 -> 3\""), "{seen}");
}

#[tokio::test]
async fn nothing_can_be_written() {
    let (_, addr) = start().await;
    for (method, path) in [("POST", "api/state"), ("PUT", "api/state"), ("DELETE", "api/stream"), ("POST", "")] {
        let (status, _, _) = request(method, format!("http://{addr}/{path}")).await;
        assert_eq!(status, 405, "{method} /{path}");
    }
    let (status, _, _) = request("GET", format!("http://{addr}/api/secrets")).await;
    assert_eq!(status, 404);
}
