//! Embedded refinery migrations (from `sql/`), run under an advisory lock so many instances can
//! start at once, with a clear error when the database is newer than this build.

use tracing::info;

use crate::db::Executor;
use crate::error::{Error, Result};

mod embedded {
    refinery::embed_migrations!("sql");
}

/// Where refinery records applied migrations.
pub(crate) const HISTORY_TABLE: &str = "pgcrew.refinery_schema_history";

/// Advisory lock key serialising migrators until the installation secret exists (V008);
/// from then on the key is derived with the secret (`pgcrew.lock_key('migrate', 'pgcrew')`), so a
/// role that can connect but cannot read the secret cannot hold every migrator hostage.
const LEGACY_MIGRATE_LOCK_KEY: i64 = 0x7067_6372_6577_0001;

/// The migration that creates the installation secret.
const SECRET_VERSION: i32 = 8;

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
    let row = Executor::query_one(client, sql!("db/schema_history_exists"), typed![]).await?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = Executor::query_one(client, sql!("db/schema_version"), typed![]).await?;
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
///
/// Migrators are serialised by a session advisory lock. Once the installation secret exists
/// its key is secret-derived; a database older than V008 is first migrated up to V008 under the
/// legacy key (re-checking the secret once the lock is held), then the rest runs under the new
/// key, so two migrators never run under different keys at once.
pub(crate) async fn run(client: &mut tokio_postgres::Client) -> Result<MigrationReport> {
    let mut total: Option<MigrationReport> = None;
    loop {
        let secret = Executor::query_one(client, sql!("db/installation_secret_exists"), typed![])
            .await?
            .get::<_, bool>(0);
        let (key, target) = if secret {
            let key: i64 = Executor::query_one(client, sql!("db/migrate_lock_key"), typed![])
                .await?
                .get(0);
            (key, None)
        } else {
            (LEGACY_MIGRATE_LOCK_KEY, Some(SECRET_VERSION))
        };
        Executor::execute(client, sql!("db/advisory_lock"), typed![&key]).await?;
        let result = if target.is_some()
            && Executor::query_one(client, sql!("db/installation_secret_exists"), typed![])
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false)
        {
            // Another migrator created the secret while we waited: switch keys.
            None
        } else {
            Some(run_locked(client, target).await)
        };
        let unlock = Executor::execute(client, sql!("db/advisory_unlock"), typed![&key]).await;
        let Some(result) = result else {
            unlock?;
            continue;
        };
        let report = result?;
        unlock?;
        let done = target.is_none();
        total = Some(match total {
            None => report,
            Some(mut t) => {
                t.to_version = report.to_version;
                t.applied.extend(report.applied);
                t
            }
        });
        if done {
            return total.ok_or_else(|| Error::Migration("no migration report".into()));
        }
    }
}

async fn run_locked(
    client: &mut tokio_postgres::Client,
    target: Option<i32>,
) -> Result<MigrationReport> {
    let before = current_version(client).await?.unwrap_or(0);
    let latest = latest_version();
    if before > latest {
        return Err(too_new(before));
    }
    client.batch_execute(sql!("db/create_schema")).await?;
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name(HISTORY_TABLE);
    if let Some(version) = target {
        runner = runner.set_target(refinery::Target::Version(version));
    }
    let report = runner
        .run_async(client)
        .await
        .map_err(|e| Error::Migration(e.to_string()))?;
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{:03}__{}", m.version(), m.name()))
        .collect();
    client
        .batch_execute(sql!("db/revoke_public_execute"))
        .await?;
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
