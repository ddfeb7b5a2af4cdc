//! Embedded refinery migrations (from `sql/`), run under an advisory lock so many instances can
//! start at once, with a clear error when the database is newer than this build.

use tracing::info;

use crate::error::{Error, Result};

mod embedded {
    refinery::embed_migrations!("sql");
}

/// Where refinery records applied migrations.
pub(crate) const HISTORY_TABLE: &str = "pgcrew.refinery_schema_history";

/// Advisory lock key serialising concurrent migrators (`hashtext('pgcrew.migrate')` is not
/// stable across versions, so a fixed constant is used).
const MIGRATE_LOCK_KEY: i64 = 0x7067_6372_6577_0001;

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The schema version before the run (0 for a fresh database).
    pub from_version: i64,
    /// The schema version after the run.
    pub to_version: i64,
    /// Names (`V001__core`) of the migrations applied by this run.
    pub applied: Vec<String>,
}

/// The newest migration version embedded in this build.
pub fn latest_version() -> i64 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

async fn current_version(client: &tokio_postgres::Client) -> Result<Option<i64>> {
    let row = client
        .query_one(sql!("db/schema_history_exists"), &[])
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client.query_one(sql!("db/schema_version"), &[]).await?;
    Ok(Some(row.get(0)))
}

fn too_new(database: i64) -> Error {
    Error::SchemaTooNew {
        database,
        supported: latest_version(),
        crate_version: env!("CARGO_PKG_VERSION"),
    }
}

/// Run all pending migrations.
pub(crate) async fn run(client: &mut tokio_postgres::Client) -> Result<MigrationReport> {
    client
        .execute(sql!("db/advisory_lock"), &[&MIGRATE_LOCK_KEY])
        .await?;
    let result = run_locked(client).await;
    let unlock = client
        .execute(sql!("db/advisory_unlock"), &[&MIGRATE_LOCK_KEY])
        .await;
    let report = result?;
    unlock?;
    Ok(report)
}

async fn run_locked(client: &mut tokio_postgres::Client) -> Result<MigrationReport> {
    let before = current_version(client).await?.unwrap_or(0);
    let latest = latest_version();
    if before > latest {
        return Err(too_new(before));
    }
    client.batch_execute(sql!("db/create_schema")).await?;
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name(HISTORY_TABLE);
    let report = runner
        .run_async(client)
        .await
        .map_err(|e| Error::Migration(e.to_string()))?;
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{:03}__{}", m.version(), m.name()))
        .collect();
    let after = current_version(client).await?.unwrap_or(0);
    for name in &applied {
        info!(migration = %name, "applied migration");
    }
    Ok(MigrationReport {
        from_version: before,
        to_version: after,
        applied,
    })
}

/// Check that the schema exists and matches this build exactly.
pub(crate) async fn check(client: &tokio_postgres::Client) -> Result<i64> {
    let latest = latest_version();
    match current_version(client).await? {
        None => Err(Error::SchemaMissing),
        Some(v) if v > latest => Err(too_new(v)),
        Some(v) if v < latest => Err(Error::SchemaOutdated {
            database: v,
            required: latest,
        }),
        Some(v) => Ok(v),
    }
}
