//! The page itself, in headless Chromium: a frame and a timeline entry published while the page is open must
//! show up live — the nodes coloured by verdict, the delegation path drawn, the entry on the timeline.

mod support;

use std::time::Duration;

use rootscale_dashboard::{Dashboard, EdgeView, Event, EventKind, Frame, ServiceView, server};
use support::browser::{Browser, screenshot_path};

fn service(name: &str, verdict: &str, delegated_to: &[&str], latency_ms: f64) -> ServiceView {
    ServiceView {
        name: name.into(),
        group: "test".into(),
        replicas: 1,
        verdict: verdict.into(),
        delegated_to: delegated_to.iter().map(|s| s.to_string()).collect(),
        latency_ms,
        target_ms: Some(100.0),
        local_wait_ms: latency_ms / 2.0,
        rps: 50.0,
        ..ServiceView::default()
    }
}

fn frame(db_verdict: &str) -> Frame {
    let web_verdict = if db_verdict == "root-cause" { "delegated" } else { "healthy" };
    Frame::new(
        vec![
            service("web", web_verdict, &["db"], 140.0),
            service("db", db_verdict, &[], 120.0),
            service("cache", "healthy", &[], 2.0),
        ],
        vec![
            EdgeView { from: "web".into(), to: "db".into(), rps: 50.0 },
            EdgeView { from: "web".into(), to: "cache".into(), rps: 50.0 },
        ],
        vec!["web".into()],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_updates_colour_the_graph_draw_the_path_and_fill_the_timeline() {
    let dashboard = Dashboard::new("browser test", "local");
    dashboard.publish(frame("healthy"));
    let addr = server::serve(dashboard.clone(), "127.0.0.1:0".parse().unwrap(), std::future::pending()).await.unwrap();
    let browser = Browser::start().await;
    browser.open(&format!("http://{addr}/")).await;
    browser
        .wait_for(
            "document.querySelector('g.node[data-service=\"db\"][data-verdict=\"healthy\"]')",
            "document.getElementById('graph').outerHTML",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(browser.run("return document.querySelectorAll('g.edge.path').length;").await, 0);
    // Give the page a moment to open its stream, then change the picture.
    tokio::time::sleep(Duration::from_millis(500)).await;
    dashboard.publish(frame("root-cause"));
    dashboard.record(Event::new(EventKind::Scale, "db", "db 1 → 3 replicas", "1 of 1 replicas say root-cause"));
    let shown = browser
        .wait_for(
            "Number(document.body.dataset.updates) >= 2 \
             && document.querySelector('g.node[data-service=\"db\"][data-verdict=\"root-cause\"]') \
             && document.querySelector('g.edge.path[data-from=\"web\"][data-to=\"db\"]') \
             && !document.querySelector('g.edge.path[data-to=\"cache\"]') \
             && document.querySelector('#timeline li[data-kind=\"scale\"][data-service=\"db\"]') \
             && document.querySelectorAll('#services .card svg polyline.latency').length === 3 \
             && document.getElementById('headline').textContent.includes('root-cause: db')",
            "document.body.outerHTML",
            Duration::from_secs(10),
        )
        .await;
    browser.screenshot(&screenshot_path("dashboard-page")).await;
    browser.close().await;
    shown.unwrap();
}
