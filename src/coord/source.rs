//! [`DbSource`]: where an instance gets its connections.

use crate::db::Db;

/// Where the client gets its connections: a DSN, an existing deadpool pool, or a [`Db`].
///
/// Its `Debug` output shows a DSN with its password redacted.
#[derive(Clone)]
pub enum DbSource {
    /// Connect a new pool to this DSN.
    Dsn(String),
    /// Use this handle (and its pool).
    Db(Box<Db>),
}

impl std::fmt::Debug for DbSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbSource::Dsn(dsn) => f
                .debug_tuple("Dsn")
                .field(&crate::db::redact_dsn(dsn))
                .finish(),
            DbSource::Db(db) => f.debug_tuple("Db").field(db).finish(),
        }
    }
}

impl From<&str> for DbSource {
    fn from(s: &str) -> Self {
        DbSource::Dsn(s.to_string())
    }
}
impl From<String> for DbSource {
    fn from(s: String) -> Self {
        DbSource::Dsn(s)
    }
}
impl From<&String> for DbSource {
    fn from(s: &String) -> Self {
        DbSource::Dsn(s.clone())
    }
}
impl From<Db> for DbSource {
    fn from(db: Db) -> Self {
        DbSource::Db(Box::new(db))
    }
}
