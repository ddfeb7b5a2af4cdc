//! Start-up check for [`StatementMode::Cached`]: is pgcrew talking to a server connection that
//! keeps its prepared statements from one transaction to the next?
//!
//! PgBouncer in transaction mode hands a client any idle server connection for each
//! transaction. Named prepared statements (what the statement cache keeps) then live on a
//! server the client may never see again, and a later call fails with `prepared statement
//! "s1" does not exist` — at some random point under load. PgBouncer 1.21+ with
//! `max_prepared_statements` tracks them itself and re-prepares on the new server.
//!
//! The check makes the move happen instead of waiting for it: connection A prepares a named
//! statement inside a transaction and notes its backend's pid; a second connection B then
//! opens a transaction and holds it — behind a transaction pooler B gets the server A just
//! released (PgBouncer reuses the most recently released server first), and that server stays
//! B's while A runs its statement again. Directly on PostgreSQL (or behind a session pooler)
//! B always has a backend of its own and A keeps its own, so A's statement runs.
//! Behind a transaction pooler without prepared-statement support A's statement is gone
//! (SQLSTATE 26000) or A waits for the only server B holds: both are refused with an error
//! naming the setting. Behind one that supports them, it runs.

use std::time::Duration;

use tokio_postgres::SimpleQueryMessage;

use super::{Conn, StatementMode};
use crate::error::{Error, Result};
use crate::sqlstate;

/// The error for a pooler that loses prepared statements between transactions.
pub(crate) fn cached_statements_lost(what: &str) -> Error {
    Error::Config(format!(
        "{what}: the server connection changes between transactions (a connection pooler such as PgBouncer in \
         transaction mode), so prepared statements are lost; set the statement mode to `{}` \
         (CLI `--statements {}` or PGCREW_STATEMENTS={}, ClientConfig::statements, PoolOptions::statements), \
         or enable prepared statements in the pooler (PgBouncer 1.21+: max_prepared_statements), \
         or connect to PostgreSQL directly",
        StatementMode::Unnamed,
        StatementMode::Unnamed,
        StatementMode::Unnamed,
    ))
}

/// The first column of the first row of a simple query's answer, as an integer.
fn first_int(messages: &[SimpleQueryMessage]) -> Option<i64> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse().ok()),
        _ => None,
    })
}

/// Is `e` a prepared statement that is gone (26000) or a name already taken on the server
/// (42P05: another client's statement on a shared server connection)?
fn is_lost_statement(e: &tokio_postgres::Error) -> bool {
    matches!(
        sqlstate::of(e),
        Some(sqlstate::INVALID_SQL_STATEMENT_NAME | sqlstate::DUPLICATE_PREPARED_STATEMENT)
    )
}

/// Refuse [`StatementMode::Cached`] when prepared statements do not survive on the server
/// connection `a` came from (see the module documentation).
pub(crate) async fn check_cached_statements(
    a: &Conn,
    config: &super::PgConfig,
    timeout: Duration,
) -> Result<()> {
    let lost = |e: tokio_postgres::Error| {
        if is_lost_statement(&e) {
            cached_statements_lost(&format!(
                "statement caching cannot work here ({})",
                crate::error::describe_pg_error(&e)
            ))
        } else {
            Error::from(e)
        }
    };
    // A: a named statement and the pid of the backend that has it, in one transaction.
    a.simple_query(sql!("db/begin")).await?;
    let stmt = a.prepare(sql!("db/backend_pid")).await.map_err(lost)?;
    let p1: i32 = a.query_one(&stmt, &[]).await.map_err(lost)?.get(0);
    a.simple_query(sql!("db/commit")).await?;
    // B: a second client that holds a transaction (and so a server connection) open.
    let (b, driver) = super::connect_with_handler(config, |_| {}).await?;
    let p2 = first_int(&b.simple_query(sql!("db/begin_backend_pid")).await?);
    // A again, outside any transaction.
    let again = tokio::time::timeout(timeout, a.query_one(&stmt, &[])).await;
    let _ = b.simple_query(sql!("db/commit")).await;
    drop(b);
    driver.abort();
    match again {
        Ok(Ok(row)) => {
            let p3: i32 = row.get(0);
            tracing::debug!(p1, ?p2, p3, "statement cache check passed");
            Ok(())
        }
        Ok(Err(e)) => Err(lost(e)),
        Err(_) => Err(cached_statements_lost(&format!(
            "statement caching cannot work here (a statement waited {} for a server connection held by another client)",
            humantime::format_duration(timeout)
        ))),
    }
}
