//! `/events`: Server-Sent Events from the instance's LISTEN connection: a resync first, a
//! change naming the run when it changes state, and no database connection per browser.

use std::time::Duration;

use pgcrew::TenantId;
use pgcrew::runs::{self, NewRun};
use pgcrew::ui::UiConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::console;
use crate::common::{scalar, tenant};

/// An open `/events` stream, read as text.
struct Stream {
    tcp: TcpStream,
    seen: String,
}

impl Stream {
    async fn open(addr: std::net::SocketAddr) -> Stream {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(
            b"GET /events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n",
        )
        .await
        .unwrap();
        Stream {
            tcp,
            seen: String::new(),
        }
    }

    /// Read until `needle` has been seen (panics after `timeout`).
    async fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while !self.seen.contains(needle) {
            let n = tokio::time::timeout_at(deadline, self.tcp.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("`{needle}` not within {timeout:?}; got: {}", self.seen))
                .unwrap();
            assert!(n > 0, "stream closed; got: {}", self.seen);
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
}

#[tokio::test]
async fn events_resync_first_then_name_what_changed_without_a_connection_per_browser() {
    let c = console("ui-live", UiConfig::new()).await;
    tenant(&c.t, "acme", &[], None).await;
    let conns = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}'",
        c.t.scratch.name()
    );
    // Let the pools settle, then count the server's connections to this database.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = scalar(&c.t, &conns).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut s = Stream::open(c.addr).await;
        s.wait_for("event: resync", Duration::from_secs(10)).await;
        assert!(s.seen.contains("text/event-stream"), "{}", s.seen);
        streams.push(s);
    }
    let run = runs::create_run(&c.t.db, NewRun::new(TenantId::new("acme").unwrap()))
        .await
        .unwrap();
    for s in &mut streams {
        s.wait_for(&format!("\"run_id\":\"{run}\""), Duration::from_secs(10))
            .await;
        assert!(
            s.seen.contains("\"kind\":\"run_state_changed\""),
            "{}",
            s.seen
        );
    }
    let after = scalar(&c.t, &conns).await;
    assert!(
        after <= before + 1,
        "20 open streams add at most one database connection: {before} before, {after} after"
    );
}

#[tokio::test]
async fn bench_ui_reports_pages_and_sse_figures() {
    let (t, r, stderr) = crate::common::run_bench(
        "ui --tasks 200 --runs 20 --events 60 --samples 2 --clients 5 --notifies 3",
    )
    .await;
    assert_eq!(r["pages"].as_array().unwrap().len(), 16, "{r}");
    assert!(r["worst_p95_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(r["notify_deliveries"], 15, "{r}");
    assert!(
        r["connections_with_streams"].as_i64().unwrap()
            <= r["connections_before"].as_i64().unwrap() + 1,
        "{r}"
    );
    crate::common::assert_bench_database_dropped(&t, &stderr).await;
}
