//! The coordination connection: the one connection outside the pool on which a started
//! instance runs its heartbeats and leader renewals.
//!
//! With LISTEN (the default) it *is* the notifier's LISTEN connection, a direct session
//! connection the instance needs anyway; in poll-only mode it is a dedicated connection of its
//! own. Either way an instance holds `pool + 1` connections, and its liveness never waits for a
//! pooled connection, however busy its workers keep the pool. When the connection is down
//! (killed, network cut) the notifier (or, in poll-only mode, this module) reconnects with
//! backoff; meanwhile a statement borrows a pooled connection for a bounded time instead, so
//! heartbeats go on whenever the pool has one to spare.
//!
//! Each new session gets a `lock_timeout` ([`ClientConfig::coordination_lock_timeout`]): a
//! renewal queued behind the leader's own maintenance step (which holds the leader row
//! `FOR SHARE`) fails and is retried instead of holding up the heartbeats queued behind it.

use std::ops::Deref;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::config::ClientConfig;
use crate::db::{Conn, Db};
use crate::error::{Error, Result};

/// A connection borrowed for coordination statements: the coordination session, or a pooled
/// connection while the session is down.
pub(crate) enum CoordConn {
    /// The coordination session.
    Session(Arc<tokio_postgres::Client>),
    /// A pooled connection (fallback).
    Pooled(Box<Conn>),
}

impl Deref for CoordConn {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        match self {
            CoordConn::Session(c) => c,
            CoordConn::Pooled(c) => c,
        }
    }
}

/// A dedicated connection of poll-only mode, reconnected with backoff.
struct Own {
    config: crate::db::PgConfig,
    client: Option<(Arc<tokio_postgres::Client>, JoinHandle<()>)>,
    backoff: Duration,
    next_attempt: Option<Instant>,
}

enum Source {
    /// The notifier's LISTEN connection.
    Listen(watch::Receiver<Option<Arc<tokio_postgres::Client>>>),
    /// Our own connection (poll-only mode).
    Own(Box<Mutex<Own>>),
}

/// The instance's coordination connection (see the module docs).
pub(crate) struct Session {
    source: Source,
    pool: Db,
    lock_timeout: String,
    /// How long a statement waits for the session, then for a pooled connection.
    wait: Duration,
    /// The session whose `lock_timeout` was set (a `Weak` keeps its address from being reused).
    prepared: std::sync::Mutex<Weak<tokio_postgres::Client>>,
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Session {
    /// Coordinate on the notifier's LISTEN connection.
    pub(crate) fn on_listen(
        listen: watch::Receiver<Option<Arc<tokio_postgres::Client>>>,
        pool: Db,
        config: &ClientConfig,
    ) -> Session {
        Session::new(Source::Listen(listen), pool, config)
    }

    /// Coordinate on a dedicated connection to `pg_config` (poll-only mode).
    pub(crate) fn dedicated(
        pg_config: crate::db::PgConfig,
        pool: Db,
        config: &ClientConfig,
    ) -> Session {
        let own = Own {
            config: pg_config,
            client: None,
            backoff: MIN_BACKOFF,
            next_attempt: None,
        };
        Session::new(Source::Own(Box::new(Mutex::new(own))), pool, config)
    }

    fn new(source: Source, pool: Db, config: &ClientConfig) -> Session {
        Session {
            source,
            pool,
            lock_timeout: format!("{}ms", config.coordination_lock_timeout().as_millis()),
            wait: config
                .coordination_lock_timeout()
                .min(config.heartbeat_interval / 2)
                .max(Duration::from_millis(50)),
            prepared: std::sync::Mutex::new(Weak::new()),
        }
    }

    /// A connection for one coordination statement (or a few): the session when it is up,
    /// otherwise a pooled connection if one frees up within a short wait.
    pub(crate) async fn get(&self) -> Result<CoordConn> {
        match self.session().await {
            Ok(c) => Ok(CoordConn::Session(c)),
            Err(e) => {
                debug!(error = %e, "coordination connection down; borrowing a pooled connection");
                match tokio::time::timeout(self.wait, self.pool.get()).await {
                    Ok(Ok(c)) => Ok(CoordConn::Pooled(Box::new(c))),
                    Ok(Err(pool_err)) => Err(pool_err),
                    Err(_) => Err(e),
                }
            }
        }
    }

    async fn session(&self) -> Result<Arc<tokio_postgres::Client>> {
        let client = match &self.source {
            Source::Listen(rx) => {
                let mut rx = rx.clone();
                let waited = tokio::time::timeout(self.wait, rx.wait_for(|c| c.is_some())).await;
                match waited {
                    Ok(Ok(c)) => c.clone(),
                    _ => None,
                }
                .ok_or_else(|| {
                    Error::Pool(
                        "the coordination (LISTEN) connection is down; the notifier is reconnecting"
                            .into(),
                    )
                })?
            }
            Source::Own(own) => own_session(&mut *own.lock().await).await?,
        };
        self.prepare(&client).await?;
        Ok(client)
    }

    /// Set the session's `lock_timeout` once per session.
    async fn prepare(&self, client: &Arc<tokio_postgres::Client>) -> Result<()> {
        let done = match self.prepared.lock() {
            Ok(w) => std::ptr::eq(w.as_ptr(), Arc::as_ptr(client)),
            Err(p) => std::ptr::eq(p.into_inner().as_ptr(), Arc::as_ptr(client)),
        };
        if done {
            return Ok(());
        }
        client
            .execute(sql!("coord/session_setup"), &[&self.lock_timeout])
            .await?;
        match self.prepared.lock() {
            Ok(mut w) => *w = Arc::downgrade(client),
            Err(p) => *p.into_inner() = Arc::downgrade(client),
        }
        Ok(())
    }

    /// Close the dedicated connection (poll-only mode; the notifier closes the LISTEN one).
    pub(crate) async fn close(&self) {
        if let Source::Own(own) = &self.source {
            let taken = own.lock().await.client.take();
            if let Some((client, driver)) = taken {
                drop(client);
                // Ends once every borrowed handle is dropped and the client has closed.
                let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
            }
        }
    }
}

/// The dedicated connection, (re)connected when it is closed, no sooner than its backoff allows.
async fn own_session(own: &mut Own) -> Result<Arc<tokio_postgres::Client>> {
    if let Some((client, driver)) = &own.client {
        if !client.is_closed() && !driver.is_finished() {
            return Ok(client.clone());
        }
        info!("coordination connection lost; reconnecting");
        own.client = None;
    }
    if let Some(at) = own.next_attempt
        && Instant::now() < at
    {
        return Err(Error::Pool(
            "the coordination connection is down; reconnecting with backoff".into(),
        ));
    }
    match crate::db::connect_with_handler(&own.config, |_| {}).await {
        Ok((client, driver)) => {
            let client = Arc::new(client);
            own.client = Some((client.clone(), driver));
            own.backoff = MIN_BACKOFF;
            own.next_attempt = None;
            Ok(client)
        }
        Err(e) => {
            let jitter =
                Duration::from_millis(fastrand::u64(0..=own.backoff.as_millis() as u64 / 4));
            own.next_attempt = Some(Instant::now() + own.backoff + jitter);
            own.backoff = (own.backoff * 2).min(MAX_BACKOFF);
            Err(e)
        }
    }
}
