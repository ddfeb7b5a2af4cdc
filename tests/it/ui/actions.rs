//! Actions: off without a token, 403 without a valid one (nothing changes), recorded with who
//! in the run's ledger; login cookie + CSRF field; bulk actions with a confirmed count, applied
//! in batches with progress.

use std::time::Duration;

use pgcrew::queue::{NewTask, TaskState};
use pgcrew::runs::{self, NewRun, RunState};
use pgcrew::ui::UiConfig;
use pgcrew::{RunId, TenantId};
use serde_json::json;

use super::{Console, TOKEN, console, get_html, get_json, http};
use crate::common::{eventually, ledger_events, tenant};

async fn pending_run(c: &Console) -> RunId {
    tenant(&c.t, "acme", &[], None).await;
    runs::create_run(&c.t.db, NewRun::new(TenantId::new("acme").unwrap()))
        .await
        .unwrap()
}

async fn run_state(c: &Console, run: RunId) -> RunState {
    runs::get_run(&c.t.db, run).await.unwrap().state
}

async fn post(c: &Console, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut r = http()
        .post(c.url(path))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_string());
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn without_a_configured_token_actions_are_refused_and_nothing_changes() {
    let c = console("ui-act-off", UiConfig::new()).await;
    let run = pending_run(&c).await;
    let bearer = format!("Bearer {TOKEN}");
    let (s, body) = post(
        &c,
        &format!("/runs/{run}/cancel"),
        "",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("actions are off"), "{body}");
    assert_eq!(run_state(&c, run).await, RunState::Pending);
    let (_, page) = get_html(&c.url(&format!("/runs/{run}"))).await;
    assert!(
        !page.contains("cancel-run"),
        "no cancel button while actions are off"
    );
}

#[tokio::test]
async fn a_run_is_cancelled_only_with_the_token_and_the_ledger_records_who() {
    let c = console("ui-act-run", UiConfig::new().token(TOKEN)).await;
    let run = pending_run(&c).await;
    let path = format!("/runs/{run}/cancel");
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong-token-wrong-token")],
        vec![("cookie", "pgcrew_ui_session=forged")],
    ] {
        let (s, body) = post(&c, &path, "reason=x", &headers).await;
        assert_eq!(s, 403, "{headers:?}: {body}");
        assert_eq!(run_state(&c, run).await, RunState::Pending);
    }
    // Log in: a wrong token is refused, the right one sets the session cookie.
    let (s, _) = post(&c, "/login", "token=nope&who=eve", &[]).await;
    assert_eq!(s, 403);
    let r = http()
        .post(c.url("/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}&who=alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let cookies: Vec<String> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
        .collect();
    let cookie = cookies.join("; ");
    assert!(
        !cookie.contains(TOKEN),
        "the cookie never carries the token"
    );
    // The logged-in page carries the CSRF field.
    let page = http()
        .get(c.url(&format!("/runs/{run}")))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    assert!(csrf.len() >= 32, "{page}");
    // Cookie without CSRF, and a cross-origin post, are refused.
    let (s, _) = post(&c, &path, "reason=x", &[("cookie", &cookie)]).await;
    assert_eq!(s, 403);
    let (s, _) = post(
        &c,
        &path,
        &format!("csrf={csrf}"),
        &[("cookie", &cookie), ("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(s, 403);
    assert_eq!(run_state(&c, run).await, RunState::Pending);
    let (s, body) = post(
        &c,
        &path,
        &format!("csrf={csrf}&reason=customer+asked"),
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(s, 303, "{body}");
    assert_eq!(run_state(&c, run).await, RunState::Cancelled);
    let evs = ledger_events(&c.t, run).await;
    let (_, _, payload) = evs.iter().find(|(t, _, _)| t == "run_cancelled").unwrap();
    let reason = payload.to_string();
    assert!(
        reason.contains("operations console by alice: customer asked"),
        "{reason}"
    );
    // Cancelling again is a conflict, not a success.
    let (s, _) = post(
        &c,
        &path,
        "",
        &[("authorization", &format!("Bearer {TOKEN}"))],
    )
    .await;
    assert_eq!(s, 409);
}

#[tokio::test]
async fn tasks_are_cancelled_and_retried_by_api_clients_with_the_bearer_token() {
    let c = console("ui-act-task", UiConfig::new().token(TOKEN)).await;
    let id = pgcrew::queue::enqueue(&c.t.db, &NewTask::new("k", &json!({})).unwrap())
        .await
        .unwrap()
        .id;
    let bearer = format!("Bearer {TOKEN}");
    let json_h = ("accept", "application/json");
    let (s, _) = post(&c, &format!("/tasks/{id}/cancel"), "", &[json_h]).await;
    assert_eq!(s, 403);
    let (s, body) = post(
        &c,
        &format!("/tasks/{id}/cancel"),
        "",
        &[("authorization", &bearer), json_h],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        pgcrew::queue::get(&c.t.db, id).await.unwrap().state,
        TaskState::Cancelled
    );
    let (s, body) = post(
        &c,
        &format!("/tasks/{id}/retry"),
        "",
        &[("authorization", &bearer), json_h],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        pgcrew::queue::get(&c.t.db, id).await.unwrap().state,
        TaskState::Available
    );
    let (s, _) = post(
        &c,
        "/tasks/424242/cancel",
        "",
        &[("authorization", &bearer), json_h],
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn bulk_actions_need_the_confirmed_count_and_apply_in_batches() {
    let c = console("ui-act-bulk", UiConfig::new().token(TOKEN)).await;
    let tasks: Vec<NewTask> = (0..450)
        .map(|i| {
            let mut t = NewTask::new("bulk", &json!({"i": i})).unwrap();
            t.queue = "bulkq".into();
            t
        })
        .collect();
    c.client.enqueue_many(&tasks).await.unwrap();
    let other = c
        .client
        .enqueue(&NewTask::new("keep", &json!({})).unwrap())
        .await
        .unwrap()
        .id;
    let bearer = format!("Bearer {TOKEN}");
    let h = [
        ("authorization", bearer.as_str()),
        ("accept", "application/json"),
    ];
    // The confirmed count must be what matches now.
    let (s, body) = post(
        &c,
        "/tasks/bulk",
        "action=cancel&f_queue=bulkq&confirm=449",
        &h,
    )
    .await;
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("450 tasks match"), "{body}");
    let (_, v) = get_json(&c.url("/api/tasks?queue=bulkq&state=cancelled")).await;
    assert_eq!(v["tasks"].as_array().unwrap().len(), 0, "nothing changed");
    let (s, body) = post(
        &c,
        "/tasks/bulk",
        "action=cancel&f_queue=bulkq&confirm=450",
        &h,
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let job: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(job["total"], 450);
    let url = c.url(&format!("/api/bulk/{}", job["id"]));
    assert!(
        eventually(Duration::from_secs(30), || async {
            get_json(&url).await.1["finished"] == true
        })
        .await,
        "bulk job did not finish"
    );
    let (_, j) = get_json(&url).await;
    assert_eq!(j["applied"], 450, "{j}");
    let (_, html) = get_html(&c.url(&format!("/bulk/{}", job["id"]))).await;
    assert!(html.contains("450 of 450 handled"), "{html}");
    let (_, v) = get_json(&c.url("/api/tasks?queue=bulkq&state=cancelled&limit=1000")).await;
    assert_eq!(v["tasks"].as_array().unwrap().len(), 450);
    assert_eq!(
        pgcrew::queue::get(&c.t.db, other).await.unwrap().state,
        TaskState::Available
    );
    // Selected rows: retry three of them.
    let (_, v) = get_json(&c.url("/api/tasks?queue=bulkq&limit=3")).await;
    let ids: Vec<String> = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| format!("ids={}", t["id"]))
        .collect();
    let (s, body) = post(
        &c,
        "/tasks/bulk",
        &format!("action=retry&{}", ids.join("&")),
        &h,
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let job: serde_json::Value = serde_json::from_str(&body).unwrap();
    let url = c.url(&format!("/api/bulk/{}", job["id"]));
    assert!(
        eventually(Duration::from_secs(10), || async {
            get_json(&url).await.1["finished"] == true
        })
        .await
    );
    let (_, v) = get_json(&c.url("/api/tasks?queue=bulkq&state=available")).await;
    assert_eq!(v["tasks"].as_array().unwrap().len(), 3);
    // Bad bulk input.
    let (s, _) = post(&c, "/tasks/bulk", "action=explode&ids=1", &h).await;
    assert_eq!(s, 400);
    let (s, _) = post(&c, "/tasks/bulk", "action=cancel&f_queue=bulkq", &h).await;
    assert_eq!(s, 400);
    let (s, _) = post(
        &c,
        "/tasks/bulk",
        "action=cancel&ids=1",
        &[("accept", "application/json")],
    )
    .await;
    assert_eq!(s, 403);
}
