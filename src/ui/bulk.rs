//! Bulk task actions: cancel, retry or discard the selected tasks, or all tasks matching a filter (the
//! form carries the count the operator confirmed; when a different number matches now, 409 and
//! nothing changes). The server applies the action in bounded batches in the background and
//! `/bulk/{id}` shows the progress (live). Each task's action is recorded with who in
//! `pgcrew.task_events`, like a single action.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Serialize;

use super::Shared;
use super::data;
use super::error::UiError;
use super::filters::TaskQuery;
use super::respond::Ctx;
use crate::ids::TaskId;
use crate::queue::TaskAction;

/// Tasks handled per batch.
pub const BATCH: i64 = 200;
/// Most tasks one selection may name.
pub const MAX_SELECTED: usize = 10_000;

/// A bulk job's progress.
#[derive(Debug, Clone, Serialize)]
pub struct BulkJob {
    /// The job.
    pub id: u64,
    /// `cancel`, `retry` or `discard`.
    pub action: String,
    /// Who started it.
    pub by: String,
    /// Tasks to handle.
    pub total: i64,
    /// Tasks the action was applied to.
    pub applied: i64,
    /// Tasks it did not apply to (already final, running, ...).
    pub skipped: i64,
    /// The first few reasons for skipping.
    pub errors: Vec<String>,
    /// Whether the job has ended.
    pub finished: bool,
}

/// The jobs of this console.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    next: AtomicU64,
    jobs: Arc<Mutex<HashMap<u64, BulkJob>>>,
}

impl Jobs {
    fn get(&self, id: u64) -> Option<BulkJob> {
        self.jobs.lock().ok()?.get(&id).cloned()
    }
}

fn update(jobs: &Mutex<HashMap<u64, BulkJob>>, id: u64, f: impl FnOnce(&mut BulkJob)) {
    if let Ok(mut j) = jobs.lock()
        && let Some(job) = j.get_mut(&id)
    {
        f(job);
    }
}

enum Target {
    Ids(Vec<TaskId>),
    Filter(TaskQuery),
}

/// `POST /tasks/bulk`: fields `action` (`cancel`/`retry`/`discard`), `csrf`, and either `ids` (repeated
/// or comma-separated) or `confirm` (the count confirmed) with the filter as `f_queue`,
/// `f_state`, `f_tenant`, `f_kind`, `f_payload`.
pub(crate) async fn start_handler(
    State(state): State<Shared>,
    ctx: Ctx,
    headers: HeaderMap,
    axum::Form(fields): axum::Form<Vec<(String, String)>>,
) -> Response {
    let field = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let who = match state.auth.check(&ctx, &headers, field("csrf")) {
        Ok(w) => w,
        Err(e) => return ctx.error(e),
    };
    match start(&state, &fields, who).await {
        Ok(job) if ctx.json => (StatusCode::ACCEPTED, axum::Json(job)).into_response(),
        Ok(job) => Redirect::to(&ctx.link(&format!("/bulk/{}", job.id))).into_response(),
        Err(e) => ctx.error(e),
    }
}

async fn start(
    state: &Shared,
    fields: &[(String, String)],
    who: String,
) -> Result<BulkJob, UiError> {
    let field = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.trim());
    let (action, task_action) = match field("action") {
        Some("cancel") => ("cancel".to_string(), TaskAction::Cancel),
        Some("retry") => ("retry".to_string(), TaskAction::Retry),
        Some("discard") => ("discard".to_string(), TaskAction::Discard),
        other => {
            return Err(UiError::bad_request(format!(
                "invalid action `{}`: cancel, retry or discard",
                other.unwrap_or("")
            )));
        }
    };
    let mut ids = Vec::new();
    for (_, v) in fields.iter().filter(|(k, _)| k == "ids") {
        for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            ids.push(
                s.parse::<TaskId>()
                    .map_err(|e| UiError::bad_request(e.to_string()))?,
            );
        }
    }
    let db = state.client.db();
    let (target, total) = if !ids.is_empty() {
        if ids.len() > MAX_SELECTED {
            return Err(UiError::bad_request(format!(
                "at most {MAX_SELECTED} tasks may be selected; use a filter"
            )));
        }
        ids.sort();
        ids.dedup();
        let n = ids.len() as i64;
        (Target::Ids(ids), n)
    } else {
        let pairs: Vec<(String, String)> = fields
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("f_")?.to_string(), v.clone())))
            .collect();
        let filter = TaskQuery::parse(&pairs)?;
        let confirm: i64 = field("confirm")
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| {
                UiError::bad_request(
                    "select tasks, or confirm the number of matching tasks (`confirm`)",
                )
            })?;
        let n = data::count_tasks(db, &filter).await?;
        if n != confirm {
            return Err(UiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{n} tasks match this filter now, not the {confirm} confirmed: nothing was changed; review and confirm again"
                ),
            ));
        }
        (Target::Filter(filter), n)
    };
    let id = state.bulk.next.fetch_add(1, Ordering::Relaxed) + 1;
    let job = BulkJob {
        id,
        action: action.clone(),
        by: who.clone(),
        total,
        applied: 0,
        skipped: 0,
        errors: Vec::new(),
        finished: false,
    };
    if let Ok(mut j) = state.bulk.jobs.lock() {
        j.insert(id, job.clone());
    }
    tracing::info!(job = id, action = %action, who = %who, total, "bulk task action started");
    let jobs = state.bulk.jobs.clone();
    let cache = state.cache.clone();
    let db = db.clone();
    tokio::spawn(async move {
        let apply = |batch: Vec<TaskId>| {
            let db = db.clone();
            let jobs = jobs.clone();
            let who = who.clone();
            async move {
                for t in batch {
                    let r = crate::queue::act_on_task(
                        &db,
                        t,
                        task_action,
                        &who,
                        super::actions::SOURCE,
                    )
                    .await;
                    update(&jobs, id, |j| match r {
                        Ok(_) => j.applied += 1,
                        Err(e) => {
                            j.skipped += 1;
                            if j.errors.len() < 5 {
                                let why = super::actions::refusal(task_action, t, e).message;
                                j.errors.push(format!("task {t}: {why}"));
                            }
                        }
                    });
                }
            }
        };
        match target {
            Target::Ids(ids) => {
                for chunk in ids.chunks(BATCH as usize) {
                    apply(chunk.to_vec()).await;
                    cache.invalidate();
                }
            }
            Target::Filter(f) => {
                let mut after = 0i64;
                let mut seen = 0i64;
                while seen < total {
                    let batch =
                        match data::task_batch(&db, &f, after, BATCH.min(total - seen)).await {
                            Ok(b) => b,
                            Err(e) => {
                                update(&jobs, id, |j| j.errors.push(e.message.clone()));
                                break;
                            }
                        };
                    let Some(last) = batch.last() else { break };
                    after = last.0;
                    seen += batch.len() as i64;
                    apply(batch).await;
                    cache.invalidate();
                }
            }
        }
        update(&jobs, id, |j| j.finished = true);
    });
    Ok(job)
}

/// `GET /bulk/{id}`: a job's progress.
pub(crate) async fn status_handler(
    State(state): State<Shared>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Response {
    let job = id
        .parse::<u64>()
        .ok()
        .and_then(|i| state.bulk.get(i))
        .map(Box::new)
        .ok_or_else(|| UiError::not_found("bulk job", &id));
    ctx.respond(job, |j| super::pages::tasks::bulk_page(&ctx, j))
}
