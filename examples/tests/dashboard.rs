//! The demo's dashboard in headless Chromium: `demo` run as a user would (with a bottleneck injected), its
//! printed dashboard URL opened, and the page watched until the live updates mark the bottleneck as the root
//! cause, draw the delegation path to it and put its scaling decision on the timeline.

#[path = "../../dashboard/tests/support/browser.rs"]
mod browser;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_dashboard_shows_the_root_cause_and_the_decision_live() {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--plain", "--dashboard", "127.0.0.1:0", "--inject", "payments=capacity:4@6s", "--duration", "35s"])
        .args(["--seed", "11"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("the demo printed its dashboard URL").unwrap();
        if let Some(url) = line.strip_prefix("Dashboard: ") {
            break url.to_string();
        }
    };
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    // Keep reading the demo's output so it never blocks on a full pipe.
    let output = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<String>>());
    let browser = browser::Browser::start().await;
    browser.open(&url).await;
    let found = browser
        .wait_for(
            "Number(document.body.dataset.updates) > 0 \
             && document.querySelector('g.node[data-service=\"payments\"][data-verdict=\"root-cause\"]') \
             && document.querySelector('g.edge.path[data-to=\"payments\"]') \
             && document.querySelector('#timeline li[data-kind=\"fault\"][data-service=\"payments\"]')",
            "document.getElementById('graph').outerHTML + document.getElementById('timeline').outerHTML",
            Duration::from_secs(30),
        )
        .await;
    browser.screenshot(&browser::screenshot_path("dashboard-demo-root-cause")).await;
    let scaled = browser
        .wait_for(
            "document.querySelector('#timeline li[data-kind=\"scale\"][data-service=\"payments\"]')",
            "document.getElementById('timeline').outerHTML",
            Duration::from_secs(20),
        )
        .await;
    browser.screenshot(&browser::screenshot_path("dashboard-demo-scaled")).await;
    browser.close().await;
    let _ = demo.kill();
    let _ = demo.wait();
    let output = output.join().unwrap_or_default();
    found.unwrap_or_else(|page| panic!("the root cause was not shown: {page}\n{}", output.join("\n")));
    scaled.unwrap_or_else(|page| panic!("the decision was not shown: {page}\n{}", output.join("\n")));
}
