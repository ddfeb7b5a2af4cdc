//! A counting TCP proxy in front of PostgreSQL: the client-side statement counter of
//! `pgcrew bench agents` when the server has no `pg_stat_statements`.
//!
//! It forwards bytes both ways unchanged and reads the frontend messages (protocol 3) of each
//! connection: a simple `Query` is one statement and one round trip; an extended-protocol
//! `Bind` executes the statement its `Parse` named (one statement); a `Sync` ends a round trip.
//! Statements are grouped by kind ([`statement_kind`]). TLS is not looked into: connect through
//! it with `sslmode=disable`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use pgcrew::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy counted.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    /// Round trips: `Sync` messages plus simple queries.
    pub round_trips: u64,
    /// Statements executed, by kind.
    pub by_kind: HashMap<String, u64>,
}

/// The running proxy; stops accepting when dropped.
pub struct CountingProxy {
    addr: SocketAddr,
    counts: Arc<Mutex<Counts>>,
    accept: JoinHandle<()>,
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl CountingProxy {
    /// Listen on a free local port and forward every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Config(format!("counting proxy: cannot listen: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("counting proxy: {e}")))?;
        let counts = Arc::new(Mutex::new(Counts::default()));
        let shared = counts.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counts = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let down = tokio::spawn(copy_back(sr, cw));
                    let _ = frontend(cr, sw, &counts).await;
                    down.abort();
                });
            }
        });
        Ok(CountingProxy {
            addr,
            counts,
            accept,
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counts so far, and reset them.
    pub fn take(&self) -> Counts {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *c)
    }
}

async fn copy_back(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.shutdown().await;
}

/// Forward the frontend's messages, counting them.
async fn frontend(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    counts: &Mutex<Counts>,
) -> std::io::Result<()> {
    // Startup: untyped messages; SSL and GSSAPI encryption requests are followed by another.
    loop {
        let len = from.read_i32().await?;
        let mut body = vec![0; usize::try_from(len).unwrap_or(4).saturating_sub(4)];
        from.read_exact(&mut body).await?;
        to.write_i32(len).await?;
        to.write_all(&body).await?;
        let code = body
            .get(..4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if !matches!(code, Some(80_877_103 | 80_877_104)) {
            break;
        }
    }
    let mut prepared: HashMap<String, String> = HashMap::new();
    let mut body = Vec::new();
    loop {
        let tag = from.read_u8().await?;
        let len = from.read_i32().await?;
        body.resize(usize::try_from(len).unwrap_or(4).saturating_sub(4), 0);
        from.read_exact(&mut body).await?;
        to.write_u8(tag).await?;
        to.write_i32(len).await?;
        to.write_all(&body).await?;
        let mut fields = body.split(|b| *b == 0).map(String::from_utf8_lossy);
        match tag {
            b'Q' => {
                let text = fields.next().unwrap_or_default();
                let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                c.round_trips += 1;
                *c.by_kind.entry(statement_kind(&text)).or_default() += 1;
            }
            b'P' => {
                let name = fields.next().unwrap_or_default().into_owned();
                let text = fields.next().unwrap_or_default();
                prepared.insert(name, statement_kind(&text));
            }
            b'B' => {
                let _portal = fields.next();
                let name = fields.next().unwrap_or_default();
                let kind = prepared
                    .get(name.as_ref())
                    .cloned()
                    .unwrap_or_else(|| "(unknown prepared statement)".into());
                let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                *c.by_kind.entry(kind).or_default() += 1;
            }
            b'S' => {
                counts.lock().unwrap_or_else(|p| p.into_inner()).round_trips += 1;
            }
            b'X' => return Ok(()),
            _ => {}
        }
    }
}

/// A short label for a statement: its first keyword and the first `pgcrew.` object it names
/// (`SELECT pgcrew.claim_tasks`, `UPDATE pgcrew.tasks`), or its first words; comments and
/// blank space are skipped.
pub fn statement_kind(text: &str) -> String {
    let code: String = text
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ");
    let words: Vec<&str> = code.split_whitespace().collect();
    let first = words.first().map_or("", |w| w).to_uppercase();
    let object = code.find("pgcrew.").map(|i| {
        code[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
            .collect::<String>()
    });
    match object {
        Some(o) => format!("{first} {o}"),
        None => words.iter().take(4).copied().collect::<Vec<_>>().join(" "),
    }
}
