//! Headless Chromium, driven over the WebDriver protocol (plain HTTP + JSON) by Debian's `chromedriver`, for the
//! dashboard's browser tests in this crate, the operator and the examples (each includes this file).
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian's `chromium` and `chromium-driver`; `.ci/run`
//! installs them), or the paths in `ROOTSCALE_CHROMIUM` and `ROOTSCALE_CHROMEDRIVER`.

#![allow(dead_code)]

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::{Value, json};

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(9515)
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a laptop-sized window.
    pub async fn start() -> Self {
        let chromium = std::env::var("ROOTSCALE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let chromedriver = std::env::var("ROOTSCALE_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        for path in [&chromium, &chromedriver] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: the browser tests need Debian's chromium and chromium-driver \
                 (`./scripts/test` installs them)"
            );
        }
        let port = free_port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let mut browser = Self {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        let started = Instant::now();
        while browser.call("GET", "/status", None).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "chromedriver did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The flags keep Chromium from reaching for Google's services, which this machine's network refuses.
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1440,1000",
        ];
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        }}});
        let session = browser.call("POST", "/session", Some(capabilities)).await.expect("a browser session");
        browser.session = session["sessionId"].as_str().expect("a session id").to_string();
        browser
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = self.client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{method} {path}: {status} {value}"));
        }
        Ok(value["value"].clone())
    }

    fn at(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    pub async fn open(&self, url: &str) {
        self.call("POST", &self.at("/url"), Some(json!({ "url": url }))).await.expect("the page opens");
    }

    /// Runs `script` (a function body; `arguments` as usual) in the page and returns its value.
    pub async fn run(&self, script: &str) -> Value {
        self.call("POST", &self.at("/execute/sync"), Some(json!({ "script": script, "args": [] })))
            .await
            .expect("the script runs")
    }

    /// Waits until `condition` (an expression) is true in the page; on a timeout, returns what `explain` (an
    /// expression) says then.
    pub async fn wait_for(&self, condition: &str, explain: &str, timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if self.run(&format!("return Boolean({condition});")).await == Value::Bool(true) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(self.run(&format!("return String({explain});")).await.to_string());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Saves a PNG of the window.
    pub async fn screenshot(&self, path: &Path) {
        let encoded = self.call("GET", &self.at("/screenshot"), None).await.expect("a screenshot");
        let png = base64::engine::general_purpose::STANDARD.decode(encoded.as_str().unwrap_or_default()).unwrap();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session (which closes Chromium) and stops chromedriver.
    pub async fn close(mut self) {
        let _ = self.call("DELETE", &format!("/session/{}", self.session), None).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}

/// Where screenshots go: `target/screenshots/NAME.png` of the workspace.
pub fn screenshot_path(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots").join(format!("{name}.png"))
}
