//! A TCP proxy for fault tests: forwards 127.0.0.1:<port> to PostgreSQL and can pause traffic
//! (a network partition that keeps sockets open), add latency, or drop every connection.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The proxy's shared controls.
struct Controls {
    paused: AtomicBool,
    latency_us: AtomicU64,
    generation: AtomicU64,
    resumed: Notify,
    dropped: Notify,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    port: u16,
    controls: Arc<Controls>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Start a proxy to `upstream` (host:port).
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let controls = Arc::new(Controls {
            paused: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            resumed: Notify::new(),
            dropped: Notify::new(),
        });
        let c = controls.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let gen_ = c.generation.load(Ordering::SeqCst);
                tokio::spawn(pump(cr, sw, c.clone(), gen_));
                tokio::spawn(pump(sr, cw, c.clone(), gen_));
            }
        });
        Proxy {
            port,
            controls,
            accept,
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stop forwarding (bytes are held, sockets stay open): a silent partition.
    pub fn pause(&self) {
        self.controls.paused.store(true, Ordering::SeqCst);
    }

    /// Resume forwarding.
    pub fn resume(&self) {
        self.controls.paused.store(false, Ordering::SeqCst);
        self.controls.resumed.notify_waiters();
    }

    /// Add this much latency to every forwarded chunk.
    pub fn set_latency(&self, d: Duration) {
        self.controls
            .latency_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Close every current connection (new ones are accepted).
    pub fn drop_connections(&self) {
        self.controls.generation.fetch_add(1, Ordering::SeqCst);
        self.controls.dropped.notify_waiters();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_connections();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    c: Arc<Controls>,
    generation: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if c.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = c.dropped.notified() => return,
        };
        while c.paused.load(Ordering::SeqCst) {
            tokio::select! {
                _ = c.resumed.notified() => {}
                _ = c.dropped.notified() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let lat = c.latency_us.load(Ordering::SeqCst);
        if lat > 0 {
            tokio::time::sleep(Duration::from_micros(lat)).await;
        }
        if c.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The same DSN, pointed at 127.0.0.1:`port` (a proxy in front of the server).
pub fn with_port(dsn: &str, port: u16) -> String {
    let cfg = pgcrew::db::parse_dsn(dsn).unwrap();
    let user = cfg.get_user().unwrap_or("postgres");
    let password = cfg
        .get_password()
        .map(|p| format!(" password='{}'", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    format!(
        "host=127.0.0.1 port={port} user='{user}'{password} dbname='{}'",
        cfg.get_dbname().unwrap()
    )
}

/// The `host:port` a DSN connects to (the proxy's upstream).
pub fn upstream(dsn: &str) -> String {
    let cfg = pgcrew::db::parse_dsn(dsn).unwrap();
    let host = match &cfg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(_) => "127.0.0.1".into(),
    };
    format!("{host}:{}", cfg.get_ports()[0])
}
