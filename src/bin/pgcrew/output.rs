//! Shared CLI plumbing: DSN resolution, `--json`, and table printing.

use std::time::Duration;

use clap::Args;
use pgcrew::db::{Db, TempCluster};
use pgcrew::{Error, Result};

/// A `--json` flag for read commands.
#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Parse a duration argument (`500ms`, `2s`, `1m`, ...) for clap.
pub fn duration_arg(s: &str) -> std::result::Result<Duration, String> {
    pgcrew::config::parse_duration(s).map_err(|e| e.to_string())
}

/// A DSN from the command line or the environment. Its `Debug` output redacts the password,
/// so that `Debug` of the parsed arguments never shows it.
#[derive(Clone)]
pub struct DsnArg(pub String);

impl std::str::FromStr for DsnArg {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(DsnArg(s.to_string()))
    }
}

impl std::fmt::Debug for DsnArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DsnArg")
            .field(&pgcrew::db::redact_dsn(&self.0))
            .finish()
    }
}

/// The DSN or a clear error saying how to give one.
pub fn require_dsn(dsn: Option<String>) -> Result<String> {
    dsn.filter(|d| !d.trim().is_empty()).ok_or_else(|| Error::Connect {
        message: "no database given: pass --dsn or set DATABASE_URL (e.g. postgres://user@127.0.0.1:5432/db)".into(),
    })
}

static STATEMENTS: std::sync::OnceLock<pgcrew::db::StatementMode> = std::sync::OnceLock::new();

/// Record the `--statements` setting (once, from `main`).
pub fn set_statements(mode: pgcrew::db::StatementMode) {
    let _ = STATEMENTS.set(mode);
}

/// The `--statements` setting (`cached` unless given).
pub fn statements() -> pgcrew::db::StatementMode {
    STATEMENTS.get().copied().unwrap_or_default()
}

/// Connect a pool of `size` with the CLI's `--statements` setting.
pub async fn connect_pool(dsn: &str, size: usize, connect_timeout: Duration) -> Result<Db> {
    Db::connect_with(
        dsn,
        pgcrew::db::PoolOptions {
            size,
            connect_timeout,
            statements: statements(),
            ..Default::default()
        },
    )
    .await
}

/// Connect a small pool and check the schema version. With a ledger key in the environment
/// (`PGCREW_LEDGER_KEY` / `PGCREW_LEDGER_KEY_FILE`), runs the command finishes (`run cancel`)
/// get their final checkpoint signed, as an instance would sign them.
pub async fn connect(dsn: Option<String>) -> Result<Db> {
    let dsn = require_dsn(dsn)?;
    let key = pgcrew::LedgerKey::from_env()?;
    let db = connect_pool(&dsn, 4, Duration::from_secs(10)).await?;
    db.check_schema().await?;
    Ok(match key {
        Some(key) => db.with_ledger_key(key),
        None => db,
    })
}

/// Print rows as an aligned table with a header.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let pad = widths[i].saturating_sub(c.chars().count());
                s.push_str(c);
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// Print `rows`: as pretty JSON with `--json`; otherwise `empty` when there are none (if
/// given), or an aligned table of `headers` with one `row(item)` per item.
pub fn print_rows<T: serde::Serialize>(
    json: bool,
    rows: &[T],
    empty: Option<&str>,
    headers: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> Result<()> {
    if json {
        return print_json(&rows);
    }
    match empty {
        Some(message) if rows.is_empty() => println!("{message}"),
        _ => print_table(headers, &rows.iter().map(row).collect::<Vec<_>>()),
    }
    Ok(())
}

/// The server to work on: `dsn`, or without one a throwaway local cluster, started after
/// `announce` said so. The cluster is removed when the returned guard is dropped.
pub async fn dsn_or_cluster(
    dsn: Option<String>,
    announce: impl FnOnce(),
) -> Result<(String, Option<TempCluster>)> {
    match dsn {
        Some(d) => Ok((d, None)),
        None => {
            announce();
            let c = tokio::task::spawn_blocking(TempCluster::start)
                .await
                .map_err(|e| Error::Cluster(e.to_string()))??;
            Ok((c.dsn(), Some(c)))
        }
    }
}

/// Print a value as pretty JSON.
pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
