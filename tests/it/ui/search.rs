//! The payload filter's bounded search (no GIN index: the newest N tasks, said so, with a
//! continuation further back) and the unbounded one once the index exists; discarding tasks
//! (single and bulk, with and without the token, recorded with who; running and finished tasks
//! refused).

use std::time::Duration;

use pgcrew::queue::{self, NewTask, TaskState};
use pgcrew::ui::UiConfig;
use pgcrew::{Db, TaskId};
use serde_json::{Value, json};

use super::{Console, TOKEN, console, get_html, get_json, http};
use crate::common::{eventually, scalar};

const WAIT: Duration = Duration::from_secs(30);

async fn post(c: &Console, path: &str, body: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut r = http()
        .post(c.url(path))
        .header("accept", "application/json")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_string());
    if let Some(b) = bearer {
        r = r.header("authorization", format!("Bearer {b}"));
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// 300 tasks in queue `mail` (ids ascending with `n` 1..=300); `customer` 7 for n = 10 and
/// n = 250, 0 otherwise. Returns the ids by n (index 0 is n = 1).
async fn seed(db: &Db) -> Vec<i64> {
    let conn = db.get().await.unwrap();
    conn.batch_execute(
        "INSERT INTO pgcrew.tasks (queue, kind, tenant_id, state, payload)
         SELECT 'mail', 'send', 'default', 'available',
                jsonb_build_object('customer', CASE WHEN g IN (10, 250) THEN 7 ELSE 0 END, 'n', g)
           FROM generate_series(1, 300) g",
    )
    .await
    .unwrap();
    conn.query("SELECT id FROM pgcrew.tasks ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn ids(v: &Value) -> Vec<i64> {
    v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect()
}

const CUSTOMER_7: &str = "payload=%7B%22customer%22%3A7%7D";

#[tokio::test]
async fn without_a_gin_index_the_payload_filter_searches_a_bounded_window_and_continues() {
    let c = console(
        "ui-search-bounded",
        UiConfig::new()
            .payload_window(100)
            .index_check_ttl(Duration::ZERO)
            .cache_ttl(Duration::ZERO),
    )
    .await;
    let by_n = seed(&c.t.db).await;
    // The newest 100 tasks hold n = 250, not n = 10.
    let (s, v) = get_json(&c.url(&format!("/api/tasks?{CUSTOMER_7}"))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(ids(&v), vec![by_n[249]], "{v}");
    let ps = &v["payload_search"];
    assert_eq!(ps["mode"], "bounded", "{v}");
    assert_eq!(ps["window"], 100, "{v}");
    assert_eq!(ps["scanned"], 100, "{v}");
    assert_eq!(ps["complete"], false, "{v}");
    assert_eq!(ps["scanned_ids"], json!([by_n[299], by_n[200]]), "{v}");
    let msg = ps["message"].as_str().unwrap();
    assert!(msg.contains("Searched the newest 100 tasks"), "{msg}");
    assert!(msg.contains("queue, state, tenant or kind"), "{msg}");
    assert!(
        ps["index_sql"]
            .as_str()
            .unwrap()
            .contains("USING gin (payload"),
        "{v}"
    );
    assert_eq!(v["next_before"], by_n[200], "{v}");
    let (_, html) = get_html(&c.url(&format!("/tasks?{CUSTOMER_7}"))).await;
    assert!(html.contains("data-mode=\"bounded\""), "{html}");
    assert!(html.contains("Search further back"), "{html}");
    assert!(html.contains(&format!("before={}", by_n[200])), "{html}");
    // Further back: n 101..=200 (no match), then n 1..=100 (n = 10), then nothing.
    let (_, v2) = get_json(&c.url(&format!("/api/tasks?{CUSTOMER_7}&before={}", by_n[200]))).await;
    assert_eq!(ids(&v2), Vec::<i64>::new(), "{v2}");
    assert_eq!(v2["payload_search"]["scanned"], 100, "{v2}");
    assert_eq!(v2["next_before"], by_n[100], "{v2}");
    let (_, v3) = get_json(&c.url(&format!("/api/tasks?{CUSTOMER_7}&before={}", by_n[100]))).await;
    assert_eq!(ids(&v3), vec![by_n[9]], "{v3}");
    assert_eq!(v3["next_before"], by_n[0], "{v3}");
    let (_, v4) = get_json(&c.url(&format!("/api/tasks?{CUSTOMER_7}&before={}", by_n[0]))).await;
    assert_eq!(ids(&v4), Vec::<i64>::new(), "{v4}");
    assert_eq!(v4["payload_search"]["complete"], true, "{v4}");
    assert_eq!(v4["payload_search"]["scanned"], 0, "{v4}");
    assert_eq!(v4["next_before"], Value::Null, "{v4}");
    // Other filters without an index apply inside the window of the newest tasks.
    let (_, v5) = get_json(&c.url(&format!("/api/tasks?queue=mail&kind=send&{CUSTOMER_7}"))).await;
    assert_eq!(ids(&v5), vec![by_n[249]], "{v5}");
    assert_eq!(v5["payload_search"]["window_over"], "all_tasks", "{v5}");
    assert_eq!(v5["payload_search"]["scanned"], 100, "{v5}");
    assert_eq!(v5["payload_search"]["filtered"], 100, "{v5}");
    // A state with its own index (running) narrows the window first: every running task is
    // searched when no more than the window match, however old.
    c.t.db
        .get()
        .await
        .unwrap()
        .batch_execute(&format!(
            "UPDATE pgcrew.tasks SET state = 'running' WHERE id IN ({}, {})",
            by_n[9], by_n[4]
        ))
        .await
        .unwrap();
    let (_, v6) = get_json(&c.url(&format!("/api/tasks?state=running&{CUSTOMER_7}"))).await;
    assert_eq!(ids(&v6), vec![by_n[9]], "{v6}");
    let ps = &v6["payload_search"];
    assert_eq!(ps["window_over"], "filtered_tasks", "{v6}");
    assert_eq!(ps["scanned"], 2, "{v6}");
    assert_eq!(ps["complete"], true, "{v6}");
    assert_eq!(v6["next_before"], Value::Null, "{v6}");
    assert!(
        ps["message"]
            .as_str()
            .unwrap()
            .contains("Searched all 2 tasks matching the other filters"),
        "{v6}"
    );
    // More available tasks than the window: the window is the newest tasks of all again.
    let (_, v7) = get_json(&c.url(&format!("/api/tasks?state=available&{CUSTOMER_7}"))).await;
    assert_eq!(v7["payload_search"]["window_over"], "all_tasks", "{v7}");
    assert_eq!(ids(&v7), vec![by_n[249]], "{v7}");
    // A page limit smaller than the matches in the window continues from the last one shown.
    let (_, v8) = get_json(&c.url("/api/tasks?payload=%7B%22customer%22%3A0%7D&limit=5")).await;
    let got = ids(&v8);
    assert_eq!(got.len(), 5, "{v8}");
    assert_eq!(v8["next_before"], got[4], "{v8}");
    // A malformed cursor is a 400 naming it.
    let (s, e) = get_json(&c.url(&format!("/api/tasks?{CUSTOMER_7}&before=x"))).await;
    assert_eq!(s, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("before"), "{e}");
}

#[tokio::test]
async fn with_a_gin_index_on_payload_the_filter_searches_every_task() {
    let c = console(
        "ui-search-index",
        UiConfig::new()
            .payload_window(100)
            .index_check_ttl(Duration::ZERO)
            .cache_ttl(Duration::ZERO),
    )
    .await;
    let by_n = seed(&c.t.db).await;
    let (_, v) = get_json(&c.url(&format!("/api/tasks?{CUSTOMER_7}"))).await;
    assert_eq!(v["payload_search"]["mode"], "bounded", "{v}");
    c.t.db
        .get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE INDEX tasks_payload_idx ON pgcrew.tasks USING gin (payload jsonb_path_ops)",
        )
        .await
        .unwrap();
    let (_, v) = get_json(&c.url(&format!("/api/tasks?{CUSTOMER_7}"))).await;
    let ps = &v["payload_search"];
    assert_eq!(ps["mode"], "index", "{v}");
    assert_eq!(ps["window"], Value::Null, "{v}");
    assert_eq!(ps["index_sql"], Value::Null, "{v}");
    assert_eq!(ids(&v), vec![by_n[249], by_n[9]], "{v}");
    assert_eq!(v["next_before"], Value::Null, "{v}");
    let (_, html) = get_html(&c.url(&format!("/tasks?{CUSTOMER_7}"))).await;
    assert!(html.contains("data-mode=\"index\""), "{html}");
    assert!(!html.contains("Search further back"), "{html}");
    // No payload filter: no search report.
    let (_, v) = get_json(&c.url("/api/tasks?limit=1")).await;
    assert_eq!(v["payload_search"], Value::Null, "{v}");
    assert_eq!(v["next_before"], by_n[299], "{v}");
}

async fn task(db: &Db, queue_name: &str) -> TaskId {
    let mut t = NewTask::new("send", &json!({"n": 1})).unwrap();
    t.queue = queue_name.into();
    queue::enqueue(db, &t).await.unwrap().id
}

async fn set_state(db: &Db, id: TaskId, state: &str) {
    db.get()
        .await
        .unwrap()
        .execute(
            "UPDATE pgcrew.tasks SET state = $2, claim_token = CASE WHEN $2 = 'running' THEN gen_random_uuid() END,
                    claimed_by = CASE WHEN $2 = 'running' THEN 'someone' END,
                    heartbeat_at = CASE WHEN $2 = 'running' THEN now() END,
                    finalized_at = CASE WHEN $2 IN ('completed', 'discarded', 'cancelled') THEN now() END
              WHERE id = $1",
            &[&id.0, &state],
        )
        .await
        .unwrap();
}

async fn state_of(db: &Db, id: TaskId) -> TaskState {
    queue::get(db, id).await.unwrap().state
}

#[tokio::test]
async fn a_task_is_discarded_only_with_the_token_recorded_with_who_and_dependants_follow() {
    let c = console(
        "ui-discard",
        UiConfig::new().token(TOKEN).cache_ttl(Duration::ZERO),
    )
    .await;
    let db = &c.t.db;
    let parent = task(db, "mail").await;
    let mut child = NewTask::new("send", &json!({"n": 2})).unwrap();
    child.queue = "mail".into();
    let child = queue::enqueue(db, &child.depends_on([parent]))
        .await
        .unwrap()
        .id;
    assert_eq!(state_of(db, child).await, TaskState::Scheduled);
    let path = format!("/tasks/{parent}/discard");
    for bearer in [None, Some("wrong-token-wrong-token")] {
        let (s, body) = post(&c, &path, "", bearer).await;
        assert_eq!(s, 403, "{body}");
        assert_eq!(state_of(db, parent).await, TaskState::Available);
    }
    assert_eq!(
        scalar(db, "SELECT count(*) FROM pgcrew.task_events").await,
        0
    );
    let (_, page) = get_html(&c.url(&format!("/tasks/{parent}"))).await;
    assert!(page.contains("discard-task"), "{page}");
    let (s, body) = post(&c, &path, "", Some(TOKEN)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["state"], "discarded", "{body}");
    let t = queue::get(db, parent).await.unwrap();
    assert_eq!(t.state, TaskState::Discarded);
    assert!(t.finalized_at.is_some());
    assert_eq!(
        t.last_error.as_deref(),
        Some("discarded in the operations console by api client")
    );
    // The dependant behaves as for any discarded parent (V011): cancelled.
    assert_eq!(state_of(db, child).await, TaskState::Cancelled);
    let (_, d) = get_json(&c.url(&format!("/api/tasks/{parent}"))).await;
    let ev = &d["events"][0];
    assert_eq!(
        (
            ev["action"].as_str(),
            ev["actor"].as_str(),
            ev["previous_state"].as_str(),
            ev["state"].as_str(),
            ev["source"].as_str()
        ),
        (
            Some("discard"),
            Some("api client"),
            Some("available"),
            Some("discarded"),
            Some("console")
        ),
        "{d}"
    );
    // Running and finished tasks are refused with the reason; nothing changes or is recorded.
    let running = task(db, "mail").await;
    set_state(db, running, "running").await;
    let completed = task(db, "mail").await;
    set_state(db, completed, "completed").await;
    for (id, st) in [
        (running, TaskState::Running),
        (completed, TaskState::Completed),
        (parent, TaskState::Discarded),
    ] {
        let (s, body) = post(&c, &format!("/tasks/{id}/discard"), "", Some(TOKEN)).await;
        assert_eq!(s, 409, "{body}");
        let e = body["error"].as_str().unwrap();
        assert!(
            e.contains(&format!("task {id} is {}", st.as_str())) && e.contains("not running"),
            "{e}"
        );
        assert_eq!(state_of(db, id).await, st);
    }
    assert_eq!(
        scalar(db, "SELECT count(*) FROM pgcrew.task_events").await,
        1
    );
    // Scheduled and retryable tasks are discarded too; the library call refuses a running one.
    let scheduled = task(db, "mail").await;
    set_state(db, scheduled, "scheduled").await;
    let retryable = task(db, "mail").await;
    set_state(db, retryable, "retryable").await;
    for id in [scheduled, retryable] {
        assert_eq!(
            queue::discard(db, id, "by hand").await.unwrap(),
            TaskState::Discarded
        );
    }
    assert!(matches!(
        queue::discard(db, running, "by hand").await,
        Err(pgcrew::Error::IllegalTransition { .. })
    ));
    assert!(matches!(
        queue::discard(db, TaskId(i64::MAX), "by hand").await,
        Err(pgcrew::Error::NotFound { .. })
    ));
    let (s, _) = post(&c, "/tasks/999999999/discard", "", Some(TOKEN)).await;
    assert_eq!(s, 404);
}

async fn finished_job(c: &Console, job: &Value) -> Value {
    let url = c.url(&format!("/api/bulk/{}", job["id"]));
    assert!(
        eventually(WAIT, || async {
            get_json(&url).await.1["finished"] == true
        })
        .await,
        "bulk job did not finish"
    );
    get_json(&url).await.1
}

#[tokio::test]
async fn bulk_discard_applies_to_waiting_tasks_skips_running_ones_and_needs_the_token() {
    let c = console(
        "ui-discard-bulk",
        UiConfig::new().token(TOKEN).cache_ttl(Duration::ZERO),
    )
    .await;
    let db = &c.t.db;
    let a = task(db, "bulkd").await;
    let b = task(db, "bulkd").await;
    let r = task(db, "bulkd").await;
    set_state(db, r, "running").await;
    let body = format!("action=discard&ids={a},{b},{r}");
    for bearer in [None, Some("wrong-token-wrong-token")] {
        let (s, v) = post(&c, "/tasks/bulk", &body, bearer).await;
        assert_eq!(s, 403, "{v}");
    }
    let (s, _) = post(
        &c,
        "/tasks/bulk",
        "action=discard&f_queue=bulkd&confirm=3",
        None,
    )
    .await;
    assert_eq!(s, 403);
    for id in [a, b] {
        assert_eq!(state_of(db, id).await, TaskState::Available);
    }
    assert_eq!(
        scalar(db, "SELECT count(*) FROM pgcrew.task_events").await,
        0
    );
    let (s, job) = post(&c, "/tasks/bulk", &body, Some(TOKEN)).await;
    assert_eq!(s, 202, "{job}");
    assert_eq!(job["action"], "discard");
    let j = finished_job(&c, &job).await;
    assert_eq!(
        (j["applied"].as_i64(), j["skipped"].as_i64()),
        (Some(2), Some(1)),
        "{j}"
    );
    let why = j["errors"][0].as_str().unwrap();
    assert!(why.contains(&format!("task {r} is running")), "{why}");
    for id in [a, b] {
        assert_eq!(state_of(db, id).await, TaskState::Discarded);
    }
    assert_eq!(state_of(db, r).await, TaskState::Running);
    assert_eq!(
        scalar(
            db,
            "SELECT count(*) FROM pgcrew.task_events WHERE action = 'discard' AND actor = 'api client'"
        )
        .await,
        2
    );
    // All matching a filter, with the confirmed count.
    let more = [task(db, "bulke").await, task(db, "bulke").await];
    let (s, job) = post(
        &c,
        "/tasks/bulk",
        "action=discard&f_queue=bulke&f_state=available&confirm=2",
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 202, "{job}");
    let j = finished_job(&c, &job).await;
    assert_eq!(j["applied"], 2, "{j}");
    for id in more {
        assert_eq!(state_of(db, id).await, TaskState::Discarded);
    }
    let (_, html) = get_html(&c.url("/tasks?queue=bulke")).await;
    assert!(
        html.contains("Discard all") || html.contains("Discard selected"),
        "{html}"
    );
}
