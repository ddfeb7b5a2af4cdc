//! Per-run artifacts (versioned key/value JSON: latest and history) and summaries (typed text or
//! JSON entries).

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::instrument;

use super::state::ensure_run;
use super::{limits, map_db_error};
use crate::db::Db;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::RunId;

/// One version of an artifact.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Artifact {
    /// The run.
    pub run_id: RunId,
    /// The key.
    pub key: String,
    /// Version (1, 2, ...).
    pub version: i32,
    /// The value.
    pub value: serde_json::Value,
    /// When this version was stored.
    pub created_at: DateTime<Utc>,
}

/// A summary's content.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum SummaryContent {
    /// Plain text.
    Text(String),
    /// Structured JSON.
    Json(serde_json::Value),
}

/// A summary entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Id (increasing).
    pub id: i64,
    /// The run.
    pub run_id: RunId,
    /// Type (`conversation`, `plan`, ...).
    pub summary_type: String,
    /// Content.
    pub content: SummaryContent,
    /// Created.
    pub created_at: DateTime<Utc>,
}

fn artifact(r: &tokio_postgres::Row) -> Artifact {
    Artifact {
        run_id: r.get(0),
        key: r.get(1),
        version: r.get(2),
        value: r.get(3),
        created_at: r.get(4),
    }
}

fn summary(r: &tokio_postgres::Row) -> Summary {
    let text: Option<String> = r.get(3);
    let json: Option<serde_json::Value> = r.get(4);
    Summary {
        id: r.get(0),
        run_id: r.get(1),
        summary_type: r.get(2),
        content: match text {
            Some(t) => SummaryContent::Text(t),
            None => SummaryContent::Json(json.unwrap_or(serde_json::Value::Null)),
        },
        created_at: r.get(5),
    }
}

fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 256 {
        return Err(Error::invalid(
            "artifact key",
            "must be 1 to 256 bytes long",
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(Error::invalid(
            "artifact key",
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Store a new version of `key` for a run (version = previous + 1, serialised per run).
///
/// Like [`append_event`](super::append_event): with `lease_token`, the write is refused with
/// [`Error::LeaseLost`] unless that token is the run's current, unexpired lease. Writes to a
/// finished run are refused with [`Error::RunFinished`], a value over the handle's limit
/// ([`Db::run_limits`], at most the 1 MiB hard cap) with [`Error::TooLarge`]; nothing is stored.
#[instrument(skip(db, value), err)]
pub async fn put_artifact(
    db: &Db,
    run: RunId,
    key: &str,
    value: serde_json::Value,
    lease_token: Option<i64>,
) -> Result<Artifact> {
    validate_key(key)?;
    limits::check(
        "artifact value",
        limits::json_len(&value),
        db.run_limits().max_artifact_bytes,
    )?;
    let row = db
        .query_one(
            sql!("runs/put_artifact"),
            typed![&run, &lease_token, &key, &value],
        )
        .await
        .map_err(|e| map_db_error(e, run))?;
    Ok(artifact(&row))
}

/// The latest version of an artifact, if any.
#[instrument(skip(db), err)]
pub async fn get_artifact(db: &Db, run: RunId, key: &str) -> Result<Option<Artifact>> {
    let row = db
        .query_opt(sql!("runs/get_artifact"), typed![&run, &key])
        .await?;
    Ok(row.as_ref().map(artifact))
}

/// Every version of an artifact, oldest first.
#[instrument(skip(db), err)]
pub async fn artifact_history(db: &Db, run: RunId, key: &str) -> Result<Vec<Artifact>> {
    let rows = db
        .query(sql!("runs/artifact_history"), typed![&run, &key])
        .await?;
    Ok(rows.iter().map(artifact).collect())
}

/// The latest version of every artifact of a run, by key.
#[instrument(skip(db), err)]
pub async fn list_artifacts(db: &Db, run: RunId) -> Result<Vec<Artifact>> {
    let conn = db.get().await?;
    ensure_run(&conn, run).await?;
    let rows = conn
        .query(sql!("runs/list_artifacts"), typed![&run])
        .await?;
    Ok(rows.iter().map(artifact).collect())
}

/// Add a summary to a run.
///
/// With `lease_token`, refused with [`Error::LeaseLost`] unless that token is the run's current,
/// unexpired lease; refused with [`Error::RunFinished`] on a finished run and with
/// [`Error::TooLarge`] when the content (text, or compact JSON) is over the handle's limit
/// ([`Db::run_limits`], at most the 1 MiB hard cap); nothing is stored.
#[instrument(skip(db, content), err)]
pub async fn add_summary(
    db: &Db,
    run: RunId,
    summary_type: &str,
    content: SummaryContent,
    lease_token: Option<i64>,
) -> Result<Summary> {
    crate::ids::validate_text_id("summary type", summary_type)?;
    let size = match &content {
        SummaryContent::Text(t) => t.len(),
        SummaryContent::Json(j) => limits::json_len(j),
    };
    limits::check("summary content", size, db.run_limits().max_summary_bytes)?;
    let (text, json) = match content {
        SummaryContent::Text(t) => (Some(t), None),
        SummaryContent::Json(j) => (None, Some(j)),
    };
    let row = db
        .query_one(
            sql!("runs/add_summary"),
            typed![&run, &lease_token, &summary_type, &text, &json],
        )
        .await
        .map_err(|e| map_db_error(e, run))?;
    Ok(summary(&row))
}

/// Summaries of a run, newest first, optionally of one type.
#[instrument(skip(db), err)]
pub async fn list_summaries(
    db: &Db,
    run: RunId,
    summary_type: Option<&str>,
    limit: i64,
) -> Result<Vec<Summary>> {
    if !(1..=10_000).contains(&limit) {
        return Err(Error::invalid("limit", "must be between 1 and 10000"));
    }
    let conn = db.get().await?;
    ensure_run(&conn, run).await?;
    let rows = conn
        .query(
            sql!("runs/list_summaries"),
            typed![&run, &summary_type, &limit],
        )
        .await?;
    Ok(rows.iter().map(summary).collect())
}
