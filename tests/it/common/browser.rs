//! A real headless Chromium (Debian's `chromium`), driven over the Chrome DevTools Protocol
//! on its loopback WebSocket: enough to open a page at 1366x768, run JavaScript in it, wait
//! for a condition inside the page (polled by the page itself, bounded), and take a
//! screenshot. One page per browser; the process and its profile go away with the value.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::WAIT;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Browser {
    _child: tokio::process::Child,
    ws: Ws,
    session: String,
    next_id: u64,
    _profile: tempfile::TempDir,
}

/// How long a condition inside the page may take to become true.
const PAGE_WAIT: Duration = Duration::from_secs(30);

impl Browser {
    /// Starts Chromium with a fresh profile and one blank page at 1366x768.
    pub async fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1366,768",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts (tests/run-all.sh installs Debian's chromium)");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.split("DevTools listening on ").nth(1) {
                    return rest.trim().to_string();
                }
            }
            panic!("chromium exited without a DevTools address")
        })
        .await
        .expect("chromium prints its DevTools address");
        // Keep draining its stderr so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        let mut browser = Browser {
            _child: child,
            ws,
            session: String::new(),
            next_id: 0,
            _profile: profile,
        };
        let target = browser
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser
            .call(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": 1366, "height": 768, "deviceScaleFactor": 1, "mobile": false}),
            )
            .await;
        browser.call("Page.enable", json!({})).await;
        // Anything that calls alert() (an injected script would) leaves a mark instead of
        // blocking the page.
        browser
            .call(
                "Page.addScriptToEvaluateOnNewDocument",
                json!({"source": "window.__alerts = []; window.alert = m => window.__alerts.push(String(m));"}),
            )
            .await;
        browser
    }

    /// Sends one command (to the page once attached) and returns its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(WsMessage::Text(msg.to_string().into()))
            .await
            .unwrap();
        let answer = tokio::time::timeout(WAIT, async {
            loop {
                let frame = self.ws.next().await.expect("chromium closed").unwrap();
                let WsMessage::Text(text) = frame else {
                    continue;
                };
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["id"] == json!(id) {
                    return v;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no answer to {method}"));
        if let Some(err) = answer.get("error") {
            panic!("{method} failed: {err}");
        }
        answer["result"].clone()
    }

    /// Styles the page for print (`@media print`), or back for the screen.
    pub async fn emulate_print(&mut self, print: bool) {
        self.call(
            "Emulation.setEmulatedMedia",
            json!({"media": if print { "print" } else { "" }}),
        )
        .await;
    }

    /// Prints the page to PDF as the browser's print dialog would, with the page size its
    /// CSS asks for; returns the PDF's bytes.
    pub async fn print_to_pdf(&mut self) -> Vec<u8> {
        use base64::Engine as _;
        let r = self
            .call(
                "Page.printToPDF",
                json!({"preferCSSPageSize": true, "printBackground": false}),
            )
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("PDF data"))
            .expect("base64 PDF")
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!(
                "script failed: {}\n{expression}",
                e["exception"]["description"]
                    .as_str()
                    .unwrap_or(&e.to_string())
            );
        }
        r["result"]["value"].clone()
    }

    /// Waits until `predicate` (a JS expression) is truthy in the page, and returns its value.
    /// The page polls it itself, every 25 ms, for at most 30 s.
    pub async fn wait_for(&mut self, predicate: &str) -> Value {
        let script = format!(
            r#"new Promise((resolve, reject) => {{
                const started = Date.now();
                const poll = () => {{
                    let v;
                    try {{ v = ({predicate}); }} catch (e) {{ v = undefined; }}
                    if (v) return resolve(v);
                    if (Date.now() - started > {ms}) return reject(new Error("timed out waiting for: " + {src}));
                    setTimeout(poll, 25);
                }};
                poll();
            }})"#,
            ms = PAGE_WAIT.as_millis(),
            src = serde_json::to_string(predicate).unwrap(),
        );
        self.eval(&script).await
    }

    pub async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")
            .await;
    }

    /// Opens the staff page at `base` and signs in as `user`, until the dashboard shows.
    pub async fn sign_in(&mut self, base: &str, user: &str, password: &str) {
        self.goto(&format!("{base}/")).await;
        self.wait_for("document.querySelector('#signin')").await;
        self.fill("#signin input[name=name]", user).await;
        self.fill("#signin input[name=password]", password).await;
        self.click("#signin button[type=submit]").await;
        self.wait_for("document.querySelector('#main').dataset.view === 'dashboard'")
            .await;
    }

    /// Sets a form field's value as typing would (and fires `input`/`change`).
    pub async fn fill(&mut self, selector: &str, value: &str) {
        self.eval(&format!(
            r#"(() => {{ const e = document.querySelector({sel});
                if (!e) throw new Error("no element " + {sel});
                e.value = {val};
                e.dispatchEvent(new Event("input", {{bubbles: true}}));
                e.dispatchEvent(new Event("change", {{bubbles: true}}));
                return true; }})()"#,
            sel = serde_json::to_string(selector).unwrap(),
            val = serde_json::to_string(value).unwrap(),
        ))
        .await;
    }

    pub async fn click(&mut self, selector: &str) {
        self.eval(&format!(
            r#"(() => {{ const e = document.querySelector({sel});
                if (!e) throw new Error("no element " + {sel});
                e.click(); return true; }})()"#,
            sel = serde_json::to_string(selector).unwrap(),
        ))
        .await;
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}
