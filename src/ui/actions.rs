//! Single actions: cancel a run, cancel or retry a task. Each needs the token (see `auth`);
//! without it the answer is 403 and nothing changes. A cancelled run records who cancelled it
//! in its ledger (`run_cancelled`, reason `cancelled in the operations console by <who>`, at the
//! database's time); task actions are logged (tracing) with who.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::json;

use super::Shared;
use super::error::UiError;
use super::respond::Ctx;
use crate::ids::{RunId, TaskId};

/// An action form's fields.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ActionForm {
    /// The CSRF field (browsers).
    #[serde(default)]
    pub csrf: Option<String>,
    /// Why (recorded with a run's cancellation).
    #[serde(default)]
    pub reason: Option<String>,
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

async fn task_action(
    state: Shared,
    ctx: Ctx,
    id: String,
    headers: HeaderMap,
    form: ActionForm,
    retry: bool,
) -> Response {
    let who = match state.auth.check(&ctx, &headers, form.csrf.as_deref()) {
        Ok(w) => w,
        Err(e) => return ctx.error(e),
    };
    let Ok(task) = id.parse::<TaskId>() else {
        return ctx.error(UiError::not_found("task", &id));
    };
    let db = state.client.db();
    let result = if retry {
        crate::queue::retry(db, task).await
    } else {
        crate::queue::cancel(db, task).await
    };
    let action = if retry { "retry" } else { "cancel" };
    match result {
        Ok(s) => {
            tracing::info!(task = %task, who = %who, action, "task action from the operations console");
            done(
                &ctx,
                &format!("/tasks/{task}"),
                json!({"ok": true, "task_id": task, "state": s, "by": who}),
            )
        }
        Err(e) => ctx.error(e.into()),
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
    task_action(state, ctx, id, headers, form_of(form), false).await
}

/// `POST /tasks/{id}/retry`.
pub(crate) async fn retry_task(
    State(state): State<Shared>,
    ctx: Ctx,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: FormResult,
) -> Response {
    task_action(state, ctx, id, headers, form_of(form), true).await
}
