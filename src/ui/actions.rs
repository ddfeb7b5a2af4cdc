//! Single actions: cancel a run, cancel, retry or discard a task, pause or resume a queue. Each needs
//! the token (see `auth`); without it the answer is 403 and nothing changes. Each is recorded
//! with who and when (the database's time) where its domain records things: a cancelled run in
//! its ledger (`run_cancelled`, reason `cancelled in the operations console by <who>`), a task
//! action in `pgcrew.task_events` (shown on the task page), a pause or resume in
//! `pgcrew.queue_pause_events` (shown on the overview). A successful action ends the sharing of
//! page data at once (not every action sends a notification), so the page it redirects to
//! shows its effect.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::json;

use super::Shared;
use super::error::UiError;
use super::respond::Ctx;
use crate::ids::{RunId, TaskId, TenantId};
use crate::queue::TaskAction;

/// An action form's fields.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ActionForm {
    /// The CSRF field (browsers).
    #[serde(default)]
    pub csrf: Option<String>,
    /// Why (recorded with a run's cancellation).
    #[serde(default)]
    pub reason: Option<String>,
    /// The tenant a queue is paused or resumed for alone (empty: every tenant).
    #[serde(default)]
    pub tenant: Option<String>,
}

fn done(ctx: &Ctx, back: &str, body: serde_json::Value) -> Response {
    if ctx.json {
        axum::Json(body).into_response()
    } else {
        Redirect::to(&ctx.link(back)).into_response()
    }
}

/// The form, or none (an API call without a body).
pub(crate) type FormResult =
    Result<axum::Form<ActionForm>, axum::extract::rejection::FormRejection>;

fn form_of(form: FormResult) -> ActionForm {
    form.map(|f| f.0).unwrap_or_default()
}

/// `POST /runs/{id}/cancel`.
pub(crate) async fn cancel_run(
    State(state): State<Shared>,
    ctx: Ctx,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: FormResult,
) -> Response {
    let form = form_of(form);
    let who = match state.auth.check(&ctx, &headers, form.csrf.as_deref()) {
        Ok(w) => w,
        Err(e) => return ctx.error(e),
    };
    let Ok(run) = id.parse::<RunId>() else {
        return ctx.error(UiError::not_found("run", &id));
    };
    let mut reason = format!("cancelled in the operations console by {who}");
    if let Some(r) = form
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
    {
        reason.push_str(": ");
        reason.extend(r.chars().take(500));
    }
    match crate::runs::cancel_run(state.client.db(), run, &reason).await {
        Ok(r) => {
            state.cache.invalidate();
            tracing::info!(run = %run, who = %who, "run cancelled from the operations console");
            done(
                &ctx,
                &format!("/runs/{run}"),
                json!({"ok": true, "run_id": run, "state": r.state, "reason": reason}),
            )
        }
        Err(e) => ctx.error(e.into()),
    }
}

/// Where console actions are recorded as coming from.
pub(crate) const SOURCE: &str = "console";

async fn task_action(
    state: Shared,
    ctx: Ctx,
    id: String,
    headers: HeaderMap,
    form: ActionForm,
    action: TaskAction,
) -> Response {
    let who = match state.auth.check(&ctx, &headers, form.csrf.as_deref()) {
        Ok(w) => w,
        Err(e) => return ctx.error(e),
    };
    let Ok(task) = id.parse::<TaskId>() else {
        return ctx.error(UiError::not_found("task", &id));
    };
    let result = crate::queue::act_on_task(state.client.db(), task, action, &who, SOURCE).await;
    match result {
        Ok(s) => {
            state.cache.invalidate();
            tracing::info!(task = %task, who = %who, action = action.as_str(), "task action from the operations console");
            done(
                &ctx,
                &format!("/tasks/{task}"),
                json!({"ok": true, "task_id": task, "state": s, "by": who}),
            )
        }
        Err(e) => ctx.error(refusal(action, task, e)),
    }
}

/// The console's answer to a refused task action: a discard of a running or finished task is a
/// 409 that says which tasks can be discarded; other errors as they are.
pub(crate) fn refusal(action: TaskAction, task: TaskId, e: crate::Error) -> UiError {
    match (&e, action) {
        (crate::Error::IllegalTransition { from, .. }, TaskAction::Discard) => UiError::new(
            axum::http::StatusCode::CONFLICT,
            format!(
                "task {task} is {from}: only a task that is not running and not finished (available, scheduled, retryable) can be discarded; nothing was changed"
            ),
        ),
        _ => e.into(),
    }
}

/// `POST /tasks/{id}/cancel`.
pub(crate) async fn cancel_task(
    State(state): State<Shared>,
    ctx: Ctx,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: FormResult,
) -> Response {
    task_action(state, ctx, id, headers, form_of(form), TaskAction::Cancel).await
}

/// `POST /tasks/{id}/retry`.
pub(crate) async fn retry_task(
    State(state): State<Shared>,
    ctx: Ctx,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: FormResult,
) -> Response {
    task_action(state, ctx, id, headers, form_of(form), TaskAction::Retry).await
}

/// `POST /tasks/{id}/discard`: a task that is not running and not finished becomes
/// `discarded`, reason "discarded in the operations console by <who>"; otherwise 409 with the
/// reason.
pub(crate) async fn discard_task(
    State(state): State<Shared>,
    ctx: Ctx,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: FormResult,
) -> Response {
    task_action(state, ctx, id, headers, form_of(form), TaskAction::Discard).await
}

async fn queue_action(
    state: Shared,
    ctx: Ctx,
    queue: String,
    headers: HeaderMap,
    form: ActionForm,
    pause: bool,
) -> Response {
    let who = match state.auth.check(&ctx, &headers, form.csrf.as_deref()) {
        Ok(w) => w,
        Err(e) => return ctx.error(e),
    };
    let tenant = match form
        .tenant
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        Some(t) => match TenantId::new(t) {
            Ok(t) => Some(t),
            Err(e) => return ctx.error(UiError::bad_request(e.to_string())),
        },
        None => None,
    };
    let db = state.client.db();
    match crate::queue::set_paused_by(db, &queue, tenant.as_ref(), pause, &who).await {
        Ok(changed) => {
            state.cache.invalidate();
            let action = if pause { "pause" } else { "resume" };
            tracing::info!(queue = %queue, who = %who, action, changed, "queue action from the operations console");
            done(
                &ctx,
                "/",
                json!({"ok": true, "queue": queue, "tenant_id": tenant, "action": action,
                       "changed": changed, "by": who}),
            )
        }
        Err(e) => ctx.error(e.into()),
    }
}

/// `POST /queues/{queue}/pause` (field `tenant`: pause for that tenant only).
pub(crate) async fn pause_queue(
    State(state): State<Shared>,
    ctx: Ctx,
    Path(queue): Path<String>,
    headers: HeaderMap,
    form: FormResult,
) -> Response {
    queue_action(state, ctx, queue, headers, form_of(form), true).await
}

/// `POST /queues/{queue}/resume` (field `tenant`: lift that tenant's own pause).
pub(crate) async fn resume_queue(
    State(state): State<Shared>,
    ctx: Ctx,
    Path(queue): Path<String>,
    headers: HeaderMap,
    form: FormResult,
) -> Response {
    queue_action(state, ctx, queue, headers, form_of(form), false).await
}
