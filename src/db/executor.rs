//! [`Executor`]: what pgcrew's statements run on — the pool ([`Db`]), a pooled connection or
//! transaction (whose prepared statements are cached per connection unless its pool was built
//! with [`StatementMode::Unnamed`]), or a plain client or transaction.
//!
//! Every statement the library sends goes through an [`Executor`] with explicit parameter
//! types, so it can go out either way:
//!
//! * [`StatementMode::Cached`] (the default): on a pooled connection each statement is prepared
//!   once per connection (a *named* server-side statement) and then executed with the values;
//!   PostgreSQL skips parsing and, after a few calls, planning.
//! * [`StatementMode::Unnamed`]: every statement goes out as an *unnamed* statement with its
//!   parameters in one round trip (Parse/Bind/Execute/Sync). Nothing outlives the statement, so
//!   it works behind a pooler that hands a client a different server connection for every
//!   transaction (PgBouncer in transaction mode before 1.21, or 1.21+ without
//!   `max_prepared_statements`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, RwLock, Weak};

use deadpool_postgres::StatementCache;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use super::Db;
use crate::error::{Error, Result};

/// How pgcrew sends statements on the connections of a pool ([`crate::db::PoolOptions`],
/// [`crate::ClientConfig`], the CLI's `--statements`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StatementMode {
    /// Prepare each statement once per pooled connection and reuse it (the default; fastest).
    /// Needs a server connection that keeps its prepared statements: PostgreSQL directly, or a
    /// pooler in session mode, or PgBouncer 1.21+ with `max_prepared_statements` set.
    #[default]
    Cached,
    /// Send every statement unnamed, with its parameters, in one round trip; nothing is kept on
    /// the server between statements. Use it behind PgBouncer in transaction mode (1.20 and
    /// older, or any version without `max_prepared_statements`).
    Unnamed,
}

impl StatementMode {
    /// The setting's spelling (`cached`, `unnamed`).
    pub fn as_str(self) -> &'static str {
        match self {
            StatementMode::Cached => "cached",
            StatementMode::Unnamed => "unnamed",
        }
    }
}

crate::error::display_as_str!(StatementMode);

impl std::str::FromStr for StatementMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cached" => Ok(StatementMode::Cached),
            "unnamed" => Ok(StatementMode::Unnamed),
            other => Err(Error::Config(format!(
                "unknown statement mode `{other}`: use `cached` (the default) or `unnamed` (behind PgBouncer in transaction mode)"
            ))),
        }
    }
}

/// The statement caches of pooled connections whose pool runs in [`StatementMode::Unnamed`],
/// keyed by address. A pooled connection carries no other per-pool data, and its statement
/// cache (shared with its transactions) is the one thing every pooled executor can see. The
/// weak reference keeps the allocation, so an address cannot be reused while its entry exists.
static UNNAMED: LazyLock<RwLock<HashMap<usize, Weak<StatementCache>>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));
/// How many entries `UNNAMED` holds: zero (no unnamed pool in the process) skips the lookup.
static UNNAMED_LEN: AtomicUsize = AtomicUsize::new(0);

fn key(cache: &Arc<StatementCache>) -> usize {
    Arc::as_ptr(cache) as usize
}

/// Mark a new pooled connection (its statement cache) as unnamed-mode.
pub(crate) fn register_unnamed(cache: &Arc<StatementCache>) {
    let mut map = UNNAMED.write().unwrap_or_else(|p| p.into_inner());
    map.retain(|_, w| w.strong_count() > 0);
    map.insert(key(cache), Arc::downgrade(cache));
    UNNAMED_LEN.store(map.len(), Ordering::Relaxed);
}

/// Whether a pooled connection (by its statement cache) belongs to an unnamed-mode pool.
fn is_unnamed(cache: &Arc<StatementCache>) -> bool {
    if UNNAMED_LEN.load(Ordering::Relaxed) == 0 {
        return false;
    }
    UNNAMED
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .contains_key(&key(cache))
}

pub(crate) mod private {
    /// Seals [`Executor`](super::Executor); its methods are crate-internal plumbing.
    pub trait Sealed {
        /// The handle whose settings (ledger key, checkpoint interval, run limits) apply to
        /// statements on this executor, if any.
        fn handle(&self) -> super::Handle<'_> {
            super::Handle::None
        }

        /// Whether statements on this executor are prepared once and kept (a pooled kind in
        /// [`StatementMode::Cached`](super::StatementMode::Cached)); `false` where each one goes
        /// out unnamed and is parsed and planned on every call. A statement with a function
        /// form of its own (V049) is sent as that function's call where this is `false`.
        fn caches_statements(&self) -> bool {
            false
        }
    }
}

/// Whether statements on `on` are prepared once and kept (see
/// [`private::Sealed::caches_statements`]).
pub(crate) fn caches_statements<E: Executor + ?Sized>(on: &E) -> bool {
    on.caches_statements()
}

/// Which [`Db`] handle's settings apply on an executor (crate-internal; see [`handle_of`]).
#[doc(hidden)]
#[derive(Clone, Copy)]
pub enum Handle<'a> {
    /// No handle: a plain or pooled connection or transaction (hard caps, no signing).
    None,
    /// The handle itself: every statement autocommits on a connection of its pool.
    Pool(&'a Db),
    /// A transaction begun or joined through the handle ([`Db::join`], [`super::Acquire`]).
    Transaction(&'a Db),
}

impl<'a> Handle<'a> {
    /// The handle, whether the executor is the pool or a transaction through it.
    pub(crate) fn db(self) -> Option<&'a Db> {
        match self {
            Handle::None => None,
            Handle::Pool(db) | Handle::Transaction(db) => Some(db),
        }
    }
}

/// The handle whose settings apply to statements on `on` (see [`Handle`]).
pub(crate) fn handle_of<E: Executor + ?Sized>(on: &E) -> Handle<'_> {
    private::Sealed::handle(on)
}

/// Something a statement can run on: the pool itself ([`Db`]: each statement on a connection
/// taken from the pool), a pooled connection ([`Conn`](super::Conn), or its
/// [`deadpool_postgres::ClientWrapper`]) or pooled [`deadpool_postgres::Transaction`], a plain
/// [`tokio_postgres::Client`] or [`tokio_postgres::Transaction`], or an [`Atomic`](super::Atomic)
/// unit. Library functions take `&impl Executor`, so `&db`, `&conn` and `&tx` all work.
///
/// The pool and the pooled kinds prepare each statement once per connection and reuse it
/// (PostgreSQL then skips parsing and, after a few calls, planning) — unless their pool runs in
/// [`StatementMode::Unnamed`], where they send each statement unnamed with its parameters in
/// one round trip, as the plain kinds always do (which also works behind PgBouncer in
/// transaction mode).
///
/// Parameters carry their PostgreSQL type (`(&value, type)` pairs; [`sql_type_of`] gives a value's); errors
/// come back classified as the crate's [`Error`].
///
/// # Method names on plain tokio-postgres types
///
/// [`tokio_postgres::Client`] and [`tokio_postgres::Transaction`] have inherent methods of the
/// same names (`query`, `query_one`, `query_opt`, `execute`, taking untyped parameters), and
/// inherent methods win over trait methods in method-call syntax. In generic code
/// (`E: Executor`) and on every other executor the short names resolve to this trait; on a
/// value whose type is one of those two, call the trait explicitly:
/// `Executor::query(&client, sql, typed![..])`.
///
/// The trait is sealed: it cannot be implemented outside pgcrew.
pub trait Executor: private::Sealed + Sync {
    /// Run `sql` with `params` (each with its PostgreSQL type) and return all rows.
    fn query(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>>> + Send;

    /// Run `sql` with `params` and return its single row (an error unless exactly one).
    fn query_one(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Row>> + Send;

    /// Run `sql` with `params` and return its row, if any (an error when more than one).
    fn query_opt(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Option<Row>>> + Send;

    /// Run `sql` with `params` and return the number of rows it affected.
    fn execute(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<u64>> + Send;
}

/// Call `$mac!` with the table of [`Executor`]'s methods: each with its output and the typed
/// tokio-postgres method it corresponds to (`$arg;` first, when given).
macro_rules! for_each_method {
    ($mac:ident $(, $arg:ty)?) => {
        $mac!($($arg;)?
            query -> Vec<Row> = query_typed,
            query_one -> Row = query_typed_one,
            query_opt -> Option<Row> = query_typed_opt,
            execute -> u64 = execute_typed);
    };
}

/// The plain kinds' methods: one round trip with the typed parameters, nothing cached.
macro_rules! plain_methods {
    ($($m:ident -> $out:ty = $typed:ident),*) => {$(
        async fn $m(&self, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Result<$out> {
            Ok(self.$typed(sql, params).await?)
        }
    )*};
}

/// The pooled kinds' methods (each kind with the plain type it wraps): in
/// [`StatementMode::Cached`] the statement is prepared once per connection (deadpool's statement
/// cache) and executed with the values; in [`StatementMode::Unnamed`] it goes out as the plain
/// kinds send it. The plain type's inherent methods are called by path (the trait's methods
/// share their names).
macro_rules! pooled_methods {
    ($plain:ty; $($m:ident -> $out:ty = $typed:ident),*) => {$(
        async fn $m(&self, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Result<$out> {
            let plain: &$plain = self;
            if is_unnamed(&self.statement_cache) {
                return Ok(plain.$typed(sql, params).await?);
            }
            let (types, values) = split(params);
            let stmt = self.prepare_typed_cached(sql, &types).await?;
            Ok(<$plain>::$m(plain, &stmt, &values).await?)
        }
    )*};
}

/// A pooled connection's methods: its [`deadpool_postgres::ClientWrapper`]'s.
macro_rules! object_methods {
    ($($m:ident -> $out:ty = $typed:ident),*) => {$(
        async fn $m(&self, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Result<$out> {
            let wrapper: &deadpool_postgres::ClientWrapper = self;
            wrapper.$m(sql, params).await
        }
    )*};
}

/// The pool's methods: each statement on a connection taken from the pool for it.
macro_rules! pool_methods {
    ($($m:ident -> $out:ty = $typed:ident),*) => {$(
        async fn $m(&self, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Result<$out> {
            let conn = self.get().await?;
            conn.$m(sql, params).await
        }
    )*};
}

macro_rules! plain_executor {
    ($($ty:ty),*) => {$(
        impl private::Sealed for $ty {}
        impl Executor for $ty {
            for_each_method!(plain_methods);
        }
    )*};
}

macro_rules! pooled_executor {
    ($($ty:ty => $plain:ty),*) => {$(
        impl private::Sealed for $ty {
            fn caches_statements(&self) -> bool {
                !is_unnamed(&self.statement_cache)
            }
        }
        impl Executor for $ty {
            for_each_method!(pooled_methods, $plain);
        }
    )*};
}

plain_executor!(tokio_postgres::Client, tokio_postgres::Transaction<'_>);
pooled_executor!(
    deadpool_postgres::ClientWrapper => tokio_postgres::Client,
    deadpool_postgres::Transaction<'_> => tokio_postgres::Transaction<'_>
);

/// Split typed parameters into the statement's types and the values.
fn split<'a>(
    params: &[(&'a (dyn ToSql + Sync), Type)],
) -> (Vec<Type>, Vec<&'a (dyn ToSql + Sync)>) {
    params.iter().map(|(v, t)| (t.clone(), *v)).unzip()
}

/// A pooled connection: its [`deadpool_postgres::ClientWrapper`]'s statements.
impl private::Sealed for deadpool_postgres::Object {
    fn caches_statements(&self) -> bool {
        let wrapper: &deadpool_postgres::ClientWrapper = self;
        wrapper.caches_statements()
    }
}
impl Executor for deadpool_postgres::Object {
    for_each_method!(object_methods);
}

/// The pool: each statement runs (autocommitted) on a connection taken from the pool for it,
/// in the pool's [`StatementMode`].
impl private::Sealed for Db {
    fn handle(&self) -> Handle<'_> {
        Handle::Pool(self)
    }

    fn caches_statements(&self) -> bool {
        self.statements() == StatementMode::Cached
    }
}
impl Executor for Db {
    for_each_method!(pool_methods);
}

/// The PostgreSQL type a Rust value is sent as (used by the `typed!` macro to give every
/// parameter its explicit type).
pub trait SqlType {
    /// The type.
    const TYPE: Type;
}

/// An element type of arrays: the PostgreSQL array type of `Vec<Self>` / `[Self]`.
pub trait SqlArrayElement {
    /// The array type.
    const ARRAY: Type;
}

macro_rules! sql_types {
    ($($rust:ty => $t:ident / $arr:ident),* $(,)?) => {$(
        impl SqlType for $rust {
            const TYPE: Type = Type::$t;
        }
        impl SqlArrayElement for $rust {
            const ARRAY: Type = Type::$arr;
        }
    )*};
}

sql_types!(
    bool => BOOL / BOOL_ARRAY,
    i16 => INT2 / INT2_ARRAY,
    i32 => INT4 / INT4_ARRAY,
    i64 => INT8 / INT8_ARRAY,
    f32 => FLOAT4 / FLOAT4_ARRAY,
    f64 => FLOAT8 / FLOAT8_ARRAY,
    str => TEXT / TEXT_ARRAY,
    String => TEXT / TEXT_ARRAY,
    uuid::Uuid => UUID / UUID_ARRAY,
    serde_json::Value => JSONB / JSONB_ARRAY,
    chrono::DateTime<chrono::Utc> => TIMESTAMPTZ / TIMESTAMPTZ_ARRAY,
    chrono::NaiveDate => DATE / DATE_ARRAY,
);

impl SqlType for [u8] {
    const TYPE: Type = Type::BYTEA;
}
impl SqlType for Vec<u8> {
    const TYPE: Type = Type::BYTEA;
}
impl<T: SqlType + ?Sized> SqlType for &T {
    const TYPE: Type = T::TYPE;
}
impl<T: SqlType> SqlType for Option<T> {
    const TYPE: Type = T::TYPE;
}
impl<T: SqlArrayElement + ?Sized> SqlArrayElement for &T {
    const ARRAY: Type = T::ARRAY;
}
impl<T: SqlArrayElement> SqlArrayElement for Option<T> {
    const ARRAY: Type = T::ARRAY;
}
impl<T: SqlArrayElement> SqlType for [T] {
    const TYPE: Type = T::ARRAY;
}
impl<T: SqlArrayElement> SqlType for Vec<T> {
    const TYPE: Type = T::ARRAY;
}

/// Typed parameters as the slice [`Executor`]'s methods take (for the `typed!` macro: an
/// empty list gets its type too).
pub(crate) fn typed_params<'a>(
    params: &'a [(&'a (dyn ToSql + Sync), Type)],
) -> &'a [(&'a (dyn ToSql + Sync), Type)] {
    params
}

/// The type of a value (for the `typed!` macro).
pub fn sql_type_of<T: SqlType + ?Sized>(_: &T) -> Type {
    T::TYPE
}
