//! The production-metrics views of V027 (#20) on a known workload: per tenant, per agent and
//! per instance figures, and a tenant role reading them sees only its own tenant.

use pgcrew::runs::{self, LimitPolicy, NewEvent, NewRun, RunOutcome};
use pgcrew::tenancy;
use pgcrew::vocab::EventType;
use pgcrew::{Db, RunId, TenantId};
use serde_json::json;
use tokio_postgres::Client as PgClient;

use crate::common::{register_instance, tenant, test_db};

async fn run_of(db: &Db, tenant: &TenantId, agent: &str, fork_of: Option<RunId>) -> RunId {
    let mut new = NewRun::new(tenant.clone());
    new.agent_name = Some(agent.to_string());
    if let Some(parent) = fork_of {
        new.parent_run_id = Some(parent);
        new.forked_at_seq = Some(1);
    }
    let run = runs::create_run(db, new).await.unwrap();
    runs::start_run(db, run, None, None, LimitPolicy::default())
        .await
        .unwrap();
    run
}

async fn events(db: &Db, run: RunId, types: &[EventType]) {
    let evs: Vec<NewEvent> = types
        .iter()
        .enumerate()
        .map(|(i, t)| NewEvent::new(*t, json!({"i": i})).step(format!("s{i}")))
        .collect();
    runs::append_events(db, run, &evs, None).await.unwrap();
}

async fn complete(db: &Db, run: RunId, cost: f64) {
    let outcome = RunOutcome {
        cost_usd: cost,
        ..RunOutcome::default()
    };
    runs::complete_run(db, run, outcome, None).await.unwrap();
}

/// Tenant A: alpha runs a1 (completed, 1 USD; 2 tool calls: one completed, one failed; one
/// drift), a2 (a fork of a1, completed, 3 USD; one tool call of unknown outcome; one unclean
/// harness unit), a3 (running); beta run a4 (failed). Tenant B: alpha run b1 (completed, 7 USD).
struct Workload {
    a: TenantId,
    b: TenantId,
    a1: RunId,
    a2: RunId,
}

async fn workload(db: &Db, id: &str) -> Workload {
    let a = tenant(db, &format!("va-{id}"), &[], Some(10.0)).await;
    let b = tenant(db, &format!("vb-{id}"), &[], None).await;
    use EventType::*;
    let a1 = run_of(db, &a, "alpha", None).await;
    events(
        db,
        a1,
        &[
            ToolRequested,
            ToolCompleted,
            ToolRequested,
            ToolFailed,
            ReplayedWithDrift,
        ],
    )
    .await;
    complete(db, a1, 1.0).await;
    let a2 = run_of(db, &a, "alpha", Some(a1)).await;
    events(
        db,
        a2,
        &[ToolRequested, ToolOutcomeUnknown, HarnessUnitUnclean],
    )
    .await;
    complete(db, a2, 3.0).await;
    run_of(db, &a, "alpha", None).await;
    let a4 = run_of(db, &a, "beta", None).await;
    runs::fail_run(db, a4, "test", "boom", None).await.unwrap();
    let b1 = run_of(db, &b, "alpha", None).await;
    complete(db, b1, 7.0).await;
    let conn = db.get().await.unwrap();
    conn.batch_execute(&format!(
        "UPDATE pgcrew.tenants SET spent_usd = 4, reserved_usd = 1 WHERE id = 'va-{id}';
         INSERT INTO pgcrew.cost_entries (tenant_id, run_id, category, cost_usd) VALUES
           ('va-{id}', '{a1}', 'llm', 0.75), ('va-{id}', '{a1}', 'tool', 0.25),
           ('va-{id}', '{a2}', 'llm', 3), ('vb-{id}', '{b1}', 'llm', 7);"
    ))
    .await
    .unwrap();
    Workload { a, b, a1, a2 }
}

/// The row of `sql` (one row expected) as text columns.
async fn row(c: &PgClient, sql: &str) -> Vec<Option<String>> {
    let rows = c.query(sql, &[]).await.unwrap();
    assert_eq!(rows.len(), 1, "{sql}");
    (0..rows[0].len()).map(|i| rows[0].get(i)).collect()
}

fn strs(v: &[&str]) -> Vec<Option<String>> {
    v.iter()
        .map(|s| (!s.is_empty()).then(|| s.to_string()))
        .collect()
}

async fn check_tenant_figures(c: &PgClient, w: &Workload) {
    let a = w.a.as_str();
    assert_eq!(
        row(
            c,
            &format!(
                "SELECT runs::text, finished_runs::text, completed_runs::text, failed_runs::text,
                    total_cost_usd::float8::text, avg_cost_per_run_usd::float8::text,
                    budget_utilization::float8::text, concurrent_runs::text, budget_status
               FROM pgcrew.tenant_metrics WHERE tenant_id = '{a}'"
            )
        )
        .await,
        strs(&[
            "4",
            "3",
            "2",
            "1",
            "4",
            "1.3333333333",
            "0.5",
            "1",
            "HEALTHY"
        ])
    );
    let cats = c
        .query(
            &format!(
                "SELECT category, cost_usd::float8 FROM pgcrew.tenant_cost_by_category
                  WHERE tenant_id = '{a}' ORDER BY category"
            ),
            &[],
        )
        .await
        .unwrap();
    let cats: Vec<(String, f64)> = cats.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        cats,
        vec![("llm".to_string(), 3.75), ("tool".to_string(), 0.25)]
    );
    let top = c
        .query(
            &format!(
                "SELECT run_id, cost_rank FROM pgcrew.tenant_top_cost_runs
                  WHERE tenant_id = '{a}' AND cost_rank <= 2 ORDER BY cost_rank"
            ),
            &[],
        )
        .await
        .unwrap();
    let top: Vec<(uuid::Uuid, i64)> = top.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(top, vec![(w.a2.as_uuid(), 1), (w.a1.as_uuid(), 2)]);
}

async fn check_agent_figures(c: &PgClient, w: &Workload) {
    let a = w.a.as_str();
    assert_eq!(
        row(
            c,
            &format!(
                "SELECT runs::text, runs_with_drift::text, drift_rate::float8::text, forks::text,
                    fork_rate::float8::text, tool_calls::text, tool_failures::text,
                    tool_unknown_outcomes::text, tool_failure_rate::float8::text,
                    unknown_outcome_rate::float8::text, harness_violations::text
               FROM pgcrew.agent_metrics WHERE tenant_id = '{a}' AND agent_name = 'alpha'"
            )
        )
        .await,
        strs(&[
            "3", "1", "0.333333", "1", "0.333333", "3", "1", "1", "0.333333", "0.333333", "1"
        ])
    );
    assert_eq!(
        row(
            c,
            &format!(
                "SELECT runs::text, drift_rate::float8::text, tool_failure_rate::text
               FROM pgcrew.agent_metrics WHERE tenant_id = '{a}' AND agent_name = 'beta'"
            )
        )
        .await,
        strs(&["1", "0", ""])
    );
}

#[tokio::test]
async fn tenant_and_agent_views_give_the_expected_figures() {
    let t = test_db().await;
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let w = workload(&t.db, id).await;
    let conn = t.db.get().await.unwrap();
    check_tenant_figures(&conn, &w).await;
    check_agent_figures(&conn, &w).await;
    let b = w.b.as_str();
    assert_eq!(
        row(
            &conn,
            &format!(
                "SELECT runs::text, avg_cost_per_run_usd::float8::text, budget_utilization::text
               FROM pgcrew.tenant_metrics WHERE tenant_id = '{b}'"
            )
        )
        .await,
        strs(&["1", "7", ""])
    );
}

#[tokio::test]
async fn instance_view_counts_the_tasks_each_live_instance_finished() {
    let t = test_db().await;
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let inst = register_instance(&t.db, &format!("vi-{id}")).await;
    let other = register_instance(&t.db, &format!("vo-{id}")).await;
    let conn = t.db.get().await.unwrap();
    conn.batch_execute(&format!(
        "UPDATE pgcrew.instances SET created_at = now() - interval '100 seconds' WHERE id = '{inst}';
         INSERT INTO pgcrew.tasks (queue, kind, state, claimed_by, attempts, finalized_at)
         SELECT 'q', 'k', s, '{inst}', 1, CASE WHEN s = 'running' THEN NULL ELSE now() END
           FROM unnest(ARRAY['completed', 'completed', 'completed', 'discarded', 'running']) s;
         INSERT INTO pgcrew.tasks (queue, kind, state, claimed_by, attempts, finalized_at)
         VALUES ('q', 'k', 'completed', '{other}', 1, now() - interval '10 minutes');"
    ))
    .await
    .unwrap();
    assert_eq!(
        row(
            &conn,
            &format!(
                "SELECT tasks_executed::text, tasks_succeeded::text, tasks_running::text,
                    success_rate::float8::text, throughput_last_minute_per_s::float8::text,
                    (uptime_s >= 100)::text, (throughput_per_s::float8 BETWEEN 0.03 AND 0.04)::text
               FROM pgcrew.instance_metrics WHERE instance_id = '{inst}'"
            )
        )
        .await,
        strs(&["4", "3", "1", "0.75", "0.067", "true", "true"])
    );
    assert_eq!(
        row(&conn, &format!(
            "SELECT tasks_executed::text, success_rate::float8::text, throughput_last_minute_per_s::float8::text
               FROM pgcrew.instance_metrics WHERE instance_id = '{other}'"
        ))
        .await,
        strs(&["1", "1", "0"])
    );
}

#[tokio::test]
async fn a_tenant_role_sees_only_its_own_tenant_in_the_metrics_views() {
    let t = test_db().await;
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let w = workload(&t.db, id).await;
    let role = format!("obs_{}", uuid::Uuid::new_v4().simple());
    let password = uuid::Uuid::new_v4().simple().to_string();
    let owner = t.db.get().await.unwrap();
    owner
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{password}'"
        ))
        .await
        .unwrap();
    let granted = tenancy::grant_tenant_role(&t.db, &role, &w.a)
        .await
        .unwrap();
    for v in [
        "tenant_metrics",
        "tenant_cost_by_category",
        "tenant_top_cost_runs",
        "agent_metrics",
    ] {
        assert!(
            granted.iter().any(|g| g == v),
            "{v} not granted: {granted:?}"
        );
    }
    let mut cfg = t.db.config().clone();
    cfg.user(&role).password(&password);
    let (c, connection) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    // The same figures as the owner sees for A, and nothing of B.
    check_tenant_figures(&c, &w).await;
    check_agent_figures(&c, &w).await;
    for v in [
        "tenant_metrics",
        "tenant_cost_by_category",
        "tenant_top_cost_runs",
        "agent_metrics",
    ] {
        let rows = c
            .query(&format!("SELECT tenant_id FROM pgcrew.{v}"), &[])
            .await
            .unwrap();
        assert!(!rows.is_empty(), "{v}");
        for r in rows {
            assert_eq!(
                r.get::<_, String>(0),
                w.a.as_str(),
                "{v} leaked another tenant"
            );
        }
    }
    // Operators only: every tenant's tasks.
    let err = c
        .query("SELECT * FROM pgcrew.instance_metrics", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err:?}");
    drop(c);
    task.abort();
    let _ = owner
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"))
        .await;
}
