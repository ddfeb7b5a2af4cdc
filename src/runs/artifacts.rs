//! Per-run artifacts (versioned key/value JSON: latest and history) and summaries (typed text or
//! JSON entries).

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::instrument;

use crate::db::Db;
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

async fn ensure_run(client: &tokio_postgres::Client, run: RunId) -> Result<()> {
    let exists: bool = client
        .query_one(sql!("runs/run_exists"), &[&run])
        .await?
        .get(0);
    if exists {
        Ok(())
    } else {
        Err(Error::not_found("run", run))
    }
}

/// Store a new version of `key` for a run (version = previous + 1, serialised per run).
#[instrument(skip(db, value), err)]
pub async fn put_artifact(
    db: &Db,
    run: RunId,
    key: &str,
    value: serde_json::Value,
) -> Result<Artifact> {
    validate_key(key)?;
    let mut conn = db.get().await?;
    ensure_run(&conn, run).await?;
    let tx = conn.transaction().await?;
    tx.execute(sql!("runs/lock_run"), &[&run]).await?;
    let row = tx
        .query_one(sql!("runs/put_artifact"), &[&run, &key, &value])
        .await?;
    tx.commit().await?;
    Ok(artifact(&row))
}

/// The latest version of an artifact, if any.
#[instrument(skip(db), err)]
pub async fn get_artifact(db: &Db, run: RunId, key: &str) -> Result<Option<Artifact>> {
    let conn = db.get().await?;
    let row = conn
        .query_opt(sql!("runs/get_artifact"), &[&run, &key])
        .await?;
    Ok(row.as_ref().map(artifact))
}

/// Every version of an artifact, oldest first.
#[instrument(skip(db), err)]
pub async fn artifact_history(db: &Db, run: RunId, key: &str) -> Result<Vec<Artifact>> {
    let conn = db.get().await?;
    let rows = conn
        .query(sql!("runs/artifact_history"), &[&run, &key])
        .await?;
    Ok(rows.iter().map(artifact).collect())
}

/// The latest version of every artifact of a run, by key.
#[instrument(skip(db), err)]
pub async fn list_artifacts(db: &Db, run: RunId) -> Result<Vec<Artifact>> {
    let conn = db.get().await?;
    ensure_run(&conn, run).await?;
    let rows = conn.query(sql!("runs/list_artifacts"), &[&run]).await?;
    Ok(rows.iter().map(artifact).collect())
}

/// Add a summary to a run.
#[instrument(skip(db, content), err)]
pub async fn add_summary(
    db: &Db,
    run: RunId,
    summary_type: &str,
    content: SummaryContent,
) -> Result<Summary> {
    crate::ids::validate_text_id("summary type", summary_type)?;
    let conn = db.get().await?;
    ensure_run(&conn, run).await?;
    let (text, json) = match content {
        SummaryContent::Text(t) => (Some(t), None),
        SummaryContent::Json(j) => (None, Some(j)),
    };
    let row = conn
        .query_one(
            sql!("runs/add_summary"),
            &[&run, &summary_type, &text, &json],
        )
        .await?;
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
        .query(sql!("runs/list_summaries"), &[&run, &summary_type, &limit])
        .await?;
    Ok(rows.iter().map(summary).collect())
}
