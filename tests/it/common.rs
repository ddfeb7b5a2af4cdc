//! Shared test helpers.

#![allow(dead_code)]

use std::time::Duration;

use pgcrew::db::{Db, ScratchDatabase};

/// A fresh, migrated database for one test, dropped with the returned guard.
pub struct TestDb {
    /// The scratch database (dropped on drop).
    pub scratch: ScratchDatabase,
    /// A pool on it.
    pub db: Db,
}

impl TestDb {
    /// The DSN of the test database.
    pub fn dsn(&self) -> &str {
        self.scratch.dsn()
    }
}

/// Create a fresh migrated database.
pub async fn test_db() -> TestDb {
    let scratch = ScratchDatabase::for_tests()
        .await
        .expect("create scratch database (is PostgreSQL installed?)");
    let db = Db::connect(scratch.dsn(), 24, Duration::from_secs(10))
        .await
        .expect("connect to scratch database");
    db.migrate().await.expect("migrate");
    TestDb { scratch, db }
}

/// Poll `f` every 20 ms until it returns true or `timeout` passes; returns whether it did.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Path of the built `pgcrew` binary.
pub fn pgcrew_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgcrew")
}
