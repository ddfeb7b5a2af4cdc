//! What the console shows from the database's history (V030), the same on every console and
//! after restarts: leader terms (a real failover), task actions with who and when, queue
//! pauses and resumes (403 without the token), per-minute throughput and latency sparklines
//! filled by the leader, and a tenant's budget decisions (refusals, overruns and the
//! degradations its rules made).

use std::time::Duration;

use pgcrew::queue::{self, Ack, AckOutcome, NewTask};
use pgcrew::runs::{self, NewEvent, NewRun};
use pgcrew::ui::UiConfig;
use pgcrew::{Client, InstanceId, TaskId, TenantId};
use serde_json::{Value, json};

use super::{TOKEN, console, get_html, get_json, http, serve_router};
use crate::common::{eventually, fast_config, scalar, start_client, tenant, test_db, wait_leader};

const WAIT: Duration = Duration::from_secs(20);

async fn post(url: &str, body: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut r = http()
        .post(url)
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

/// A read-only console on `client` (any client of the database): its base URL.
async fn console_on(client: &Client) -> (String, tokio::task::JoinHandle<()>) {
    let (addr, server) = serve_router(pgcrew::ui::router_with(
        client,
        UiConfig::new().cache_ttl(Duration::ZERO),
    ))
    .await;
    (format!("http://{addr}"), server)
}

fn terms(overview: &Value) -> Vec<(i64, String)> {
    overview["leader_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["term"].as_i64().unwrap(),
                t["leader_id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn leader_terms_are_in_the_database_on_every_console_and_after_a_restart() {
    let t = test_db().await;
    let a = start_client(t.dsn(), fast_config("hist-a").build().unwrap(), None).await;
    wait_leader(&a, WAIT).await;
    let first = a.leader_term().unwrap();
    let b = start_client(t.dsn(), fast_config("hist-b").build().unwrap(), None).await;
    let viewer = start_client(
        t.dsn(),
        fast_config("hist-view")
            .leader_election(false)
            .build()
            .unwrap(),
        None,
    )
    .await;
    let (one, s1) = console_on(&viewer).await;
    // Failover: the leader stops, the other instance takes a new term.
    a.stop().await.unwrap();
    wait_leader(&b, WAIT).await;
    let second = b.leader_term().unwrap();
    assert!(second > first);
    let expected = vec![
        (second, "hist-b".to_string()),
        (first, "hist-a".to_string()),
    ];
    let (s, o) = get_json(&format!("{one}/api/overview")).await;
    assert_eq!(s, 200, "{o}");
    assert_eq!(terms(&o), expected, "{o}");
    assert_eq!(o["leader_history"][0]["held_until"], Value::Null);
    assert_eq!(
        o["leader_history"][1]["held_until"], o["leader_history"][0]["acquired_at"],
        "a term is held until the next one is taken: {o}"
    );
    // A console started afterwards (a restart, or another instance) shows the same history.
    s1.abort();
    viewer.stop().await.unwrap();
    let again = start_client(
        t.dsn(),
        fast_config("hist-view-2")
            .leader_election(false)
            .build()
            .unwrap(),
        None,
    )
    .await;
    let (two, s2) = console_on(&again).await;
    let (_, o) = get_json(&format!("{two}/api/overview")).await;
    assert_eq!(terms(&o), expected, "{o}");
    let (_, page) = get_html(&format!("{two}/")).await;
    assert!(page.contains("leader-history"), "{page}");
    assert!(page.contains(&format!("data-term=\"{first}\"")), "{page}");
    // Operators read it with SQL too.
    assert_eq!(
        scalar(&t.db, "SELECT count(*) FROM pgcrew.leader_history").await,
        2
    );
    s2.abort();
    again.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn leader_history_retention_deletes_old_terms_but_never_the_newest() {
    let t = test_db().await;
    let cfg = |id: &str| {
        fast_config(id)
            .history_retention(Duration::from_millis(1))
            .build()
            .unwrap()
    };
    let a = start_client(t.dsn(), cfg("ret-a"), None).await;
    wait_leader(&a, WAIT).await;
    let b = start_client(t.dsn(), cfg("ret-b"), None).await;
    a.stop().await.unwrap();
    wait_leader(&b, WAIT).await;
    let newest = b.leader_term().unwrap();
    // b's maintenance (every 200 ms) deletes a's term; its own, the newest, stays.
    let sql = "SELECT count(*) FROM pgcrew.leader_terms";
    assert!(
        eventually(WAIT, || async { scalar(&t.db, sql).await == 1 }).await,
        "old terms are deleted"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let kept = scalar(
        &t.db,
        "SELECT coalesce(max(term), 0) FROM pgcrew.leader_terms",
    )
    .await;
    assert_eq!(kept, newest);
    assert_eq!(scalar(&t.db, sql).await, 1);
    b.stop().await.unwrap();
}

async fn available_task(db: &pgcrew::Db, queue_name: &str) -> TaskId {
    let mut task = NewTask::new("send", &json!({"n": 1})).unwrap();
    task.queue = queue_name.into();
    queue::enqueue(db, &task).await.unwrap().id
}

#[tokio::test]
async fn task_actions_are_recorded_with_who_and_when_and_shown_on_the_task_page() {
    let c = console(
        "ui-hist-task",
        UiConfig::new().token(TOKEN).cache_ttl(Duration::ZERO),
    )
    .await;
    let task = available_task(&c.t.db, "mail").await;
    // Refused without the token: nothing changes, nothing is recorded.
    let (s, _) = post(&c.url(&format!("/tasks/{task}/cancel")), "", None).await;
    assert_eq!(s, 403);
    let (s, _) = post(
        &c.url(&format!("/tasks/{task}/cancel")),
        "",
        Some("wrong-token-wrong-token"),
    )
    .await;
    assert_eq!(s, 403);
    assert_eq!(
        scalar(&c.t.db, "SELECT count(*) FROM pgcrew.task_events").await,
        0
    );
    let (s, body) = post(&c.url(&format!("/tasks/{task}/cancel")), "", Some(TOKEN)).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = post(&c.url(&format!("/tasks/{task}/retry")), "", Some(TOKEN)).await;
    assert_eq!(s, 200, "{body}");
    // A refused action (retrying an available task is fine, cancelling twice is not) records
    // nothing.
    let (s, body) = post(&c.url(&format!("/tasks/{task}/cancel")), "", Some(TOKEN)).await;
    assert_eq!(s, 200, "{body}");
    let (s, _) = post(&c.url(&format!("/tasks/{task}/cancel")), "", Some(TOKEN)).await;
    assert_eq!(s, 409);
    let (_, d) = get_json(&c.url(&format!("/api/tasks/{task}"))).await;
    let evs: Vec<(String, String, String, String)> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().into(),
                e["actor"].as_str().unwrap().into(),
                e["previous_state"].as_str().unwrap().into(),
                e["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    let who = "api client".to_string();
    assert_eq!(
        evs,
        vec![
            (
                "cancel".into(),
                who.clone(),
                "available".into(),
                "cancelled".into()
            ),
            (
                "retry".into(),
                who.clone(),
                "cancelled".into(),
                "available".into()
            ),
            (
                "cancel".into(),
                who.clone(),
                "available".into(),
                "cancelled".into()
            ),
        ],
        "{d}"
    );
    assert!(d["events"][0]["at"].as_str().is_some(), "{d}");
    let (_, page) = get_html(&c.url(&format!("/tasks/{task}"))).await;
    assert!(page.contains("id=\"task-events\""), "{page}");
    assert!(page.contains("api client"), "{page}");
    // Bulk actions record each task.
    let other = available_task(&c.t.db, "mail").await;
    let (s, body) = post(
        &c.url("/tasks/bulk"),
        &format!("action=cancel&ids={other}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let sql = format!(
        "SELECT count(*) FROM pgcrew.task_events WHERE task_id = {other} AND action = 'cancel' AND actor = 'api client'"
    );
    assert!(eventually(WAIT, || async { scalar(&c.t.db, &sql).await == 1 }).await);
}

#[tokio::test]
async fn queues_are_paused_and_resumed_only_with_the_token_and_recorded() {
    let c = console(
        "ui-hist-pause",
        UiConfig::new().token(TOKEN).cache_ttl(Duration::ZERO),
    )
    .await;
    tenant(&c.t.db, "acme", &[], None).await;
    available_task(&c.t.db, "mail").await;
    let pauses = "SELECT count(*) FROM pgcrew.queue_pauses";
    let events = "SELECT count(*) FROM pgcrew.queue_pause_events";
    for bearer in [None, Some("wrong-token-wrong-token")] {
        let (s, _) = post(&c.url("/queues/mail/pause"), "", bearer).await;
        assert_eq!(s, 403);
    }
    assert_eq!(scalar(&c.t.db, pauses).await, 0);
    assert_eq!(scalar(&c.t.db, events).await, 0);
    let (_, page) = get_html(&c.url("/")).await;
    assert!(page.contains("pause-queue"), "a pause button: {page}");

    let (s, body) = post(&c.url("/queues/mail/pause"), "", Some(TOKEN)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["changed"], true, "{body}");
    let (_, body) = post(&c.url("/queues/mail/pause"), "", Some(TOKEN)).await;
    assert_eq!(body["changed"], false, "already paused: {body}");
    let (s, body) = post(&c.url("/queues/mail/pause"), "tenant=acme", Some(TOKEN)).await;
    assert_eq!(s, 200, "{body}");
    let (_, o) = get_json(&c.url("/api/overview")).await;
    let q = o["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "mail")
        .unwrap()
        .clone();
    assert_eq!(q["pauses"].as_array().unwrap().len(), 2, "{q}");
    assert_eq!(q["pauses"][0]["tenant_id"], Value::Null, "{q}");
    assert_eq!(q["pauses"][0]["paused_by"], "api client", "{q}");
    assert_eq!(q["pauses"][1]["tenant_id"], "acme", "{q}");
    let (_, page) = get_html(&c.url("/")).await;
    assert!(page.contains("data-paused=\"true\""), "{page}");
    assert!(page.contains("resume-queue"), "{page}");

    let (s, body) = post(&c.url("/queues/mail/resume"), "", Some(TOKEN)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["changed"], true, "{body}");
    assert_eq!(
        scalar(&c.t.db, pauses).await,
        1,
        "the tenant's own pause stays"
    );
    let (_, o) = get_json(&c.url("/api/overview")).await;
    let recorded: Vec<(String, Value, bool)> = o["queue_pause_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["actor"], "api client");
            (
                e["action"].as_str().unwrap().into(),
                e["tenant_id"].clone(),
                e["changed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        recorded,
        vec![
            ("resume".into(), Value::Null, true),
            ("pause".into(), json!("acme"), true),
            ("pause".into(), Value::Null, false),
            ("pause".into(), Value::Null, true),
        ]
    );
    // Bad input: an unknown queue or tenant is 404; nothing is recorded.
    let (s, body) = post(&c.url("/queues/nope/pause"), "", Some(TOKEN)).await;
    assert_eq!(s, 404, "{body}");
    let (s, body) = post(&c.url("/queues/mail/pause"), "tenant=nobody", Some(TOKEN)).await;
    assert_eq!(s, 404, "{body}");
    assert_eq!(scalar(&c.t.db, events).await, 4);
}

#[tokio::test]
async fn the_leader_fills_per_minute_figures_and_the_overview_draws_sparklines() {
    let t = test_db().await;
    let leader = start_client(t.dsn(), fast_config("spark-l").build().unwrap(), None).await;
    wait_leader(&leader, WAIT).await;
    let (url, server) = console_on(&leader).await;
    for _ in 0..3 {
        available_task(&t.db, "mail").await;
    }
    let me = InstanceId::new("spark-worker").unwrap();
    let claimed = queue::claim(&t.db, &["mail".to_string()], 10, &me)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    let acks: Vec<Ack> = claimed
        .iter()
        .map(|c| Ack {
            id: c.id,
            token: c.token,
            outcome: AckOutcome::Complete,
        })
        .collect();
    queue::ack(&t.db, &acks).await.unwrap();
    let finished = || async {
        let (_, o) = get_json(&format!("{url}/api/overview")).await;
        o["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["queue"] == "mail")
            .map(|q| {
                q["minutes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| {
                        (
                            m["finished"].as_i64().unwrap(),
                            m["timed"].as_i64().unwrap(),
                        )
                    })
                    .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
            })
            .unwrap_or_default()
    };
    assert!(
        eventually(WAIT, || async { finished().await == (3, 3) }).await,
        "three completed tasks counted by the leader's maintenance: {:?}",
        finished().await
    );
    // Later passes rewrite the minute without counting twice.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(finished().await, (3, 3));
    let (_, page) = get_html(&format!("{url}/")).await;
    assert!(page.contains("spark-throughput"), "{page}");
    assert!(page.contains("spark-latency"), "{page}");
    assert!(
        !page.contains("data-points=\"0\""),
        "both sparklines have a point: {page}"
    );
    server.abort();
    leader.stop().await.unwrap();
}

#[tokio::test]
async fn the_tenant_page_lists_degradation_rules_and_budget_decisions() {
    let c = console("ui-hist-decide", UiConfig::new().cache_ttl(Duration::ZERO)).await;
    let t = tenant(&c.t.db, "acme", &[], Some(1.0)).await;
    let mut ctx = pgcrew::tenancy::get(&c.t.db, &t).await.unwrap().context;
    ctx.degradation = pgcrew::tenancy::DegradationPolicy::default().rule(
        pgcrew::tenancy::BudgetStatus::Warning,
        pgcrew::tenancy::DegradationAction::SwitchModel {
            from: None,
            to: "small-model".into(),
        },
    );
    pgcrew::tenancy::upsert(&c.t.db, &ctx).await.unwrap();
    let run = runs::create_run(&c.t.db, NewRun::new(TenantId::new("acme").unwrap()))
        .await
        .unwrap();
    runs::append_event(
        &c.t.db,
        run,
        NewEvent::new(
            "budget_exceeded",
            json!({"model": "m1", "scope": "tenant", "limit_usd": 1.0, "spent_usd": 0.9,
                   "estimate_usd": 0.5, "message": "tenant budget exceeded: refused 0.5 USD"}),
        )
        .step("model:1"),
        None,
    )
    .await
    .unwrap();
    let (s, d) = get_json(&c.url("/api/tenants/acme")).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["decisions"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d["decisions"][0]["event_type"], "budget_exceeded");
    assert_eq!(d["decisions"][0]["run_id"], run.to_string());
    let (_, page) = get_html(&c.url("/tenants/acme")).await;
    assert!(page.contains("id=\"degradation-rules\""), "{page}");
    assert!(page.contains("switch any model to small-model"), "{page}");
    assert!(page.contains("id=\"budget-decisions\""), "{page}");
    assert!(page.contains("tenant budget 1.0000 USD"), "{page}");
    assert!(page.contains(&format!("/runs/{run}")), "{page}");
}

#[tokio::test]
async fn the_tenant_page_and_the_run_timeline_show_degradation_decisions() {
    use pgcrew::kernel::{Kernel, ReplayPolicy, RunScope};
    use pgcrew::model::{ModelRequest, ScriptedModel, ScriptedReply};
    use pgcrew::tenancy::{
        BudgetStatus, CostCategory, CostInput, DegradationAction, DegradationPolicy,
    };

    let c = console("ui-hist-degrade", UiConfig::new().cache_ttl(Duration::ZERO)).await;
    let t = tenant(&c.t.db, "acme", &[], Some(1.0)).await;
    let mut ctx = pgcrew::tenancy::get(&c.t.db, &t).await.unwrap().context;
    ctx.degradation = DegradationPolicy::default().rule(
        BudgetStatus::Warning,
        DegradationAction::SwitchModel {
            from: Some("gpt-4o".into()),
            to: "gpt-4o-mini".into(),
        },
    );
    pgcrew::tenancy::upsert(&c.t.db, &ctx).await.unwrap();
    pgcrew::tenancy::charge(
        &c.t.db,
        &t,
        None,
        &CostInput::other(CostCategory::Other, 0.85),
    )
    .await
    .unwrap();
    let run = runs::create_run(&c.t.db, NewRun::new(t.clone()))
        .await
        .unwrap();
    let kernel = Kernel::new(
        c.t.db.clone(),
        std::sync::Arc::new(ScriptedModel::sequence(vec![ScriptedReply::text("ok")])),
    );
    kernel
        .step_model(
            &RunScope::new(run, t.clone()),
            "answer",
            &ModelRequest::new("gpt-4o").user("hi").max_tokens(20),
            ReplayPolicy::Strict,
        )
        .await
        .unwrap();

    let (s, d) = get_json(&c.url("/api/tenants/acme")).await;
    assert_eq!(s, 200, "{d}");
    let decisions = d["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 1, "{d}");
    let e = &decisions[0];
    assert_eq!(e["event_type"], "budget_degraded");
    assert_eq!(e["run_id"], run.to_string());
    assert_eq!(e["step_key"], "answer");
    assert_eq!(e["payload"]["status"], "WARNING");
    assert_eq!(e["payload"]["requested_model"], "gpt-4o");
    assert_eq!(e["payload"]["model"], "gpt-4o-mini");
    let (_, page) = get_html(&c.url("/tenants/acme")).await;
    assert!(page.contains("data-event=\"budget_degraded\""), "{page}");
    assert!(
        page.contains("degradation at WARNING: switch model gpt-4o to gpt-4o-mini"),
        "{page}"
    );
    assert!(
        page.contains("switched model gpt-4o -&gt; gpt-4o-mini"),
        "{page}"
    );

    let (s, r) = get_json(&c.url(&format!("/api/runs/{run}"))).await;
    assert_eq!(s, 200, "{r}");
    let timeline = r["timeline"].as_array().unwrap();
    let deg = timeline
        .iter()
        .find(|e| e["event_type"] == "budget_degraded")
        .unwrap_or_else(|| panic!("{r}"));
    assert_eq!(deg["category"], "budget");
    assert_eq!(deg["model"], "gpt-4o-mini");
    assert!(
        deg["decision"]
            .as_str()
            .unwrap()
            .contains("gpt-4o -> gpt-4o-mini"),
        "{deg}"
    );
    let completed = timeline
        .iter()
        .find(|e| e["event_type"] == "model_completed")
        .unwrap();
    assert_eq!(completed["model"], "gpt-4o-mini");
    let (_, page) = get_html(&c.url(&format!("/runs/{run}"))).await;
    assert!(page.contains("class=\"decision\""), "{page}");

    // The console's query reads the partial index, which now covers budget_degraded.
    let conn = c.t.db.get().await.unwrap();
    conn.batch_execute("SET enable_seqscan = off")
        .await
        .unwrap();
    let plan: Vec<String> = conn
        .query(
            "EXPLAIN SELECT run_id FROM pgcrew.events WHERE tenant_id = 'acme' \
             AND event_type IN ('budget_exceeded', 'budget_overrun', 'budget_degraded') \
             ORDER BY created_at DESC LIMIT 50",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    conn.batch_execute("RESET enable_seqscan").await.unwrap();
    assert!(
        plan.iter()
            .any(|l| l.contains("events_budget_decisions_idx")),
        "{plan:?}"
    );
}

#[tokio::test]
async fn the_leader_deletes_task_events_and_pause_records_after_their_retention() {
    let c = console("ui-hist-ret", UiConfig::new().token(TOKEN)).await;
    let task = available_task(&c.t.db, "mail").await;
    let (s, _) = post(&c.url("/queues/mail/pause"), "", Some(TOKEN)).await;
    assert_eq!(s, 200);
    let (s, _) = post(&c.url(&format!("/tasks/{task}/cancel")), "", Some(TOKEN)).await;
    assert_eq!(s, 200);
    let both = "SELECT (SELECT count(*) FROM pgcrew.task_events) * 10 + (SELECT count(*) FROM pgcrew.queue_pause_events)";
    assert_eq!(scalar(&c.t.db, both).await, 11);
    // A leader keeping both for a day leaves them alone; one keeping them 1 ms deletes them.
    let keep = start_client(c.t.dsn(), fast_config("ret-keep").build().unwrap(), None).await;
    wait_leader(&keep, WAIT).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(scalar(&c.t.db, both).await, 11);
    keep.stop().await.unwrap();
    let short = fast_config("ret-short")
        .task_retention(Duration::from_millis(1))
        .history_retention(Duration::from_millis(1))
        .build()
        .unwrap();
    let prune = start_client(c.t.dsn(), short, None).await;
    wait_leader(&prune, WAIT).await;
    assert!(eventually(WAIT, || async { scalar(&c.t.db, both).await == 0 }).await);
    prune.stop().await.unwrap();
}
