//! [`Executor`]: what the enqueue functions run on — a plain client or transaction, or a pooled
//! connection or transaction whose prepared statements are cached per connection.

use std::future::Future;

use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

mod private {
    pub trait Sealed {}
}

/// Something a statement can run on: a [`tokio_postgres::Client`] or
/// [`tokio_postgres::Transaction`], or a pooled [`deadpool_postgres::Object`] (a [`Conn`](super::Conn)),
/// [`deadpool_postgres::ClientWrapper`] or [`deadpool_postgres::Transaction`].
///
/// The pooled kinds prepare each statement once per connection and reuse it (PostgreSQL then
/// skips parsing and, after a few calls, planning); the plain kinds send the statement with its
/// parameters in one round trip each time. Pass the pooled connection itself (`&conn`, `&tx`)
/// to get the cache; `&**conn` and `&*tx` still work, uncached.
///
/// The trait is sealed: it cannot be implemented outside pgcrew.
pub trait Executor: private::Sealed + Sync {
    /// Run `sql` with `params` (each with its PostgreSQL type) and return all rows.
    fn query_typed_rows(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send;

    /// Run `sql` with `params` and return its single row (an error unless exactly one).
    fn query_typed_row(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Row, tokio_postgres::Error>> + Send;
}

/// The plain kinds: one round trip with the typed parameters, nothing cached.
macro_rules! plain_executor {
    ($($ty:ty),*) => {$(
        impl private::Sealed for $ty {}
        impl Executor for $ty {
            fn query_typed_rows(
                &self,
                sql: &str,
                params: &[(&(dyn ToSql + Sync), Type)],
            ) -> impl Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send {
                self.query_typed(sql, params)
            }

            fn query_typed_row(
                &self,
                sql: &str,
                params: &[(&(dyn ToSql + Sync), Type)],
            ) -> impl Future<Output = Result<Row, tokio_postgres::Error>> + Send {
                self.query_typed_one(sql, params)
            }
        }
    )*};
}

/// The pooled kinds: the statement is prepared once per connection (deadpool's statement
/// cache) and executed with the values.
macro_rules! cached_executor {
    ($($ty:ty),*) => {$(
        impl private::Sealed for $ty {}
        impl Executor for $ty {
            async fn query_typed_rows(
                &self,
                sql: &str,
                params: &[(&(dyn ToSql + Sync), Type)],
            ) -> Result<Vec<Row>, tokio_postgres::Error> {
                let (types, values) = split(params);
                let stmt = self.prepare_typed_cached(sql, &types).await?;
                self.query(&stmt, &values).await
            }

            async fn query_typed_row(
                &self,
                sql: &str,
                params: &[(&(dyn ToSql + Sync), Type)],
            ) -> Result<Row, tokio_postgres::Error> {
                let (types, values) = split(params);
                let stmt = self.prepare_typed_cached(sql, &types).await?;
                self.query_one(&stmt, &values).await
            }
        }
    )*};
}

plain_executor!(tokio_postgres::Client, tokio_postgres::Transaction<'_>);
cached_executor!(
    deadpool_postgres::ClientWrapper,
    deadpool_postgres::Transaction<'_>
);

/// Split typed parameters into the statement's types and the values.
fn split<'a>(
    params: &[(&'a (dyn ToSql + Sync), Type)],
) -> (Vec<Type>, Vec<&'a (dyn ToSql + Sync)>) {
    params.iter().map(|(v, t)| (t.clone(), *v)).unzip()
}

impl private::Sealed for deadpool_postgres::Object {}
impl Executor for deadpool_postgres::Object {
    fn query_typed_rows(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send {
        let wrapper: &deadpool_postgres::ClientWrapper = self;
        wrapper.query_typed_rows(sql, params)
    }

    fn query_typed_row(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Row, tokio_postgres::Error>> + Send {
        let wrapper: &deadpool_postgres::ClientWrapper = self;
        wrapper.query_typed_row(sql, params)
    }
}
