//! The operations console: its JSON endpoints and error cases over real HTTP (`http`,
//! `actions`), Server-Sent Events (`live`), and pages in headless Chromium (`browser`).

mod actions;
mod browser;
mod claims;
mod demo;
mod history;
mod http;
mod live;
mod search;

use std::net::SocketAddr;
use std::time::Duration;

use pgcrew::Client;
use pgcrew::ui::UiConfig;

use crate::common::{TestDb, fast_config, start_client, test_db};

/// A token long enough for the console.
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// A started client on a fresh database and the console served from it on a free port.
pub struct Console {
    /// The database (dropped last).
    pub t: TestDb,
    /// The console's client.
    pub client: Client,
    /// The console's address.
    pub addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Console {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Console {
    /// `http://addr` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// Serve `router` on a free localhost port.
pub async fn serve_router(router: axum::Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    (addr, server)
}

/// A console with `config` on a fresh database (its client takes no leadership).
pub async fn console(id: &str, config: UiConfig) -> Console {
    let t = test_db().await;
    let c = fast_config(id).leader_election(false).build().unwrap();
    let client = start_client(t.dsn(), c, None).await;
    let (addr, server) = serve_router(pgcrew::ui::router_with(&client, config)).await;
    Console {
        t,
        client,
        addr,
        server,
    }
}

/// A plain HTTP client that does not follow redirects.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// GET `url` with `Accept: application/json`: status and parsed body.
pub async fn get_json(url: &str) -> (u16, serde_json::Value) {
    let r = http()
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}"));
    (status, v)
}

/// GET `url` as a browser would: status and HTML.
pub async fn get_html(url: &str) -> (u16, String) {
    let r = http()
        .get(url)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A child process, killed (SIGKILL) and reaped on drop, so a failing test leaves nothing
/// running.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
