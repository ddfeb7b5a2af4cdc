//! [`Acquire`]: how a function runs several statements atomically on whatever it is given —
//! its own transaction on a pooled connection when given the pool, or the caller's transaction
//! when given one.
//!
//! A function that needs atomicity takes `&impl Acquire` and does
//!
//! ```text
//! let mut conn = on.acquire().await?;   // the pool: a pooled connection; a transaction: itself
//! let tx = conn.begin().await?;         // a new transaction, or the caller's, joined
//! ... statements on &tx ...
//! tx.commit().await?;                   // commits what it began; a joined one is the caller's
//! ```
//!
//! Given `&db`, the function's statements commit together or not at all (an error drops the
//! transaction, which rolls it back). Given a transaction (`&tx`, a tokio-postgres or pooled
//! one, or an [`Atomic`]), they join it without a savepoint: they commit or roll back with the
//! caller's transaction, and on an error the caller must roll back. A bare connection is not
//! [`Acquire`]: begin a transaction on it and pass that, or pass the pool.

use std::future::Future;

use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use super::executor::{Executor, Handle, private::Sealed};
use super::{Conn, Db};
use crate::error::Result;

/// An [`Executor`] that can run a group of statements atomically: the pool ([`Db`]), a
/// transaction ([`tokio_postgres::Transaction`], [`deadpool_postgres::Transaction`]), an
/// [`Atomic`] unit, or a transaction joined by a handle ([`Db::join`]). See the
/// [module documentation](self) for the pattern. Sealed like [`Executor`].
pub trait Acquire: Executor {
    /// Where the unit runs: a connection taken from the pool, or this transaction.
    fn acquire(&self) -> impl Future<Output = Result<Acquired<'_>>> + Send;
}

/// What [`Acquire::acquire`] gives: a connection taken from the pool, or a borrowed transaction.
pub struct Acquired<'a> {
    inner: AcquiredInner<'a>,
    handle: Handle<'a>,
}

enum AcquiredInner<'a> {
    /// Boxed: a pooled connection is large, the borrowed transactions are a pointer.
    Conn(Box<Conn>),
    Plain(&'a tokio_postgres::Transaction<'a>),
    Pooled(&'a deadpool_postgres::Transaction<'a>),
}

impl std::fmt::Debug for Acquired<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            AcquiredInner::Conn(_) => "Acquired(pooled connection)",
            AcquiredInner::Plain(_) | AcquiredInner::Pooled(_) => "Acquired(caller's transaction)",
        })
    }
}

impl Acquired<'_> {
    /// Begin the unit: a new transaction on a connection taken from the pool, or the caller's
    /// transaction, joined (no savepoint).
    pub async fn begin(&mut self) -> Result<Atomic<'_>> {
        let inner = match &mut self.inner {
            AcquiredInner::Conn(conn) => AtomicInner::Own(conn.transaction().await?),
            AcquiredInner::Plain(tx) => AtomicInner::Plain(tx),
            AcquiredInner::Pooled(tx) => AtomicInner::Pooled(tx),
        };
        Ok(Atomic {
            inner,
            handle: self.handle,
        })
    }
}

/// A group of statements that commit together: a transaction begun on a pooled connection
/// (rolled back when dropped without [`Atomic::commit`]), or a caller's transaction, joined.
/// It is an [`Executor`] and an [`Acquire`] (a function given it joins it).
pub struct Atomic<'a> {
    inner: AtomicInner<'a>,
    handle: Handle<'a>,
}

enum AtomicInner<'a> {
    Own(deadpool_postgres::Transaction<'a>),
    Plain(&'a tokio_postgres::Transaction<'a>),
    Pooled(&'a deadpool_postgres::Transaction<'a>),
}

impl std::fmt::Debug for Atomic<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            AtomicInner::Own(_) => "Atomic(own transaction)",
            AtomicInner::Plain(_) | AtomicInner::Pooled(_) => "Atomic(caller's transaction)",
        })
    }
}

impl Atomic<'_> {
    /// Commit the transaction this unit began; a joined caller's transaction is left to the
    /// caller (it commits or rolls back the unit's statements with its own).
    pub async fn commit(self) -> Result<()> {
        match self.inner {
            AtomicInner::Own(tx) => Ok(tx.commit().await?),
            AtomicInner::Plain(_) | AtomicInner::Pooled(_) => Ok(()),
        }
    }

    /// Whether the unit began a transaction of its own (false: it joined the caller's).
    pub fn is_own(&self) -> bool {
        matches!(self.inner, AtomicInner::Own(_))
    }
}

impl Sealed for Atomic<'_> {
    fn handle(&self) -> Handle<'_> {
        self.handle
    }

    fn caches_statements(&self) -> bool {
        match &self.inner {
            AtomicInner::Own(tx) => tx.caches_statements(),
            AtomicInner::Plain(tx) => tx.caches_statements(),
            AtomicInner::Pooled(tx) => tx.caches_statements(),
        }
    }
}

/// Forward one executor method to the unit's transaction.
macro_rules! forward {
    ($self:ident, $method:ident, $sql:ident, $params:ident) => {
        match &$self.inner {
            AtomicInner::Own(tx) => Executor::$method(tx, $sql, $params).await,
            AtomicInner::Plain(tx) => Executor::$method(*tx, $sql, $params).await,
            AtomicInner::Pooled(tx) => Executor::$method(*tx, $sql, $params).await,
        }
    };
}

impl Executor for Atomic<'_> {
    async fn query(&self, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Result<Vec<Row>> {
        forward!(self, query, sql, params)
    }

    async fn query_one(&self, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Result<Row> {
        forward!(self, query_one, sql, params)
    }

    async fn query_opt(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Option<Row>> {
        forward!(self, query_opt, sql, params)
    }

    async fn execute(&self, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Result<u64> {
        forward!(self, execute, sql, params)
    }
}

impl Acquire for Atomic<'_> {
    async fn acquire(&self) -> Result<Acquired<'_>> {
        let inner = match &self.inner {
            AtomicInner::Own(tx) => AcquiredInner::Pooled(tx),
            AtomicInner::Plain(tx) => AcquiredInner::Plain(tx),
            AtomicInner::Pooled(tx) => AcquiredInner::Pooled(tx),
        };
        Ok(Acquired {
            inner,
            handle: self.handle,
        })
    }
}

impl Acquire for Db {
    async fn acquire(&self) -> Result<Acquired<'_>> {
        Ok(Acquired {
            inner: AcquiredInner::Conn(Box::new(self.get().await?)),
            handle: Handle::Transaction(self),
        })
    }
}

impl Acquire for tokio_postgres::Transaction<'_> {
    async fn acquire(&self) -> Result<Acquired<'_>> {
        Ok(Acquired {
            inner: AcquiredInner::Plain(self),
            handle: Handle::None,
        })
    }
}

impl Acquire for deadpool_postgres::Transaction<'_> {
    async fn acquire(&self) -> Result<Acquired<'_>> {
        Ok(Acquired {
            inner: AcquiredInner::Pooled(self),
            handle: Handle::None,
        })
    }
}

/// A caller's transaction with a [`Db`] handle's settings ([`Db::join`]): statements run on the
/// transaction; the handle's ledger key signs the final head of a run finished in it, and its
/// run limits apply.
#[derive(Debug)]
pub struct Joined<'a, E: ?Sized> {
    db: &'a Db,
    tx: &'a E,
}

impl Db {
    /// The caller's transaction `tx` (any [`Acquire`] transaction) with this handle's settings:
    /// pass `&db.join(&tx)` where a function should use the handle's ledger key and run limits
    /// inside your transaction (a bare `&tx` carries no handle: hard caps, no signing).
    pub fn join<'a, E: Acquire + ?Sized>(&'a self, tx: &'a E) -> Joined<'a, E> {
        Joined { db: self, tx }
    }
}

impl<E: Acquire + ?Sized> Sealed for Joined<'_, E> {
    fn handle(&self) -> Handle<'_> {
        Handle::Transaction(self.db)
    }
}

impl<E: Acquire + ?Sized> Executor for Joined<'_, E> {
    fn query(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>>> + Send {
        self.tx.query(sql, params)
    }

    fn query_one(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Row>> + Send {
        self.tx.query_one(sql, params)
    }

    fn query_opt(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Option<Row>>> + Send {
        self.tx.query_opt(sql, params)
    }

    fn execute(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<u64>> + Send {
        self.tx.execute(sql, params)
    }
}

impl<E: Acquire + ?Sized> Acquire for Joined<'_, E> {
    async fn acquire(&self) -> Result<Acquired<'_>> {
        let mut acquired = self.tx.acquire().await?;
        acquired.handle = Handle::Transaction(self.db);
        Ok(acquired)
    }
}
