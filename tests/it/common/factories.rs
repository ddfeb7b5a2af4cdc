//! Row factories: tenants, instances, tasks and run events.

use std::sync::Arc;
use std::time::Duration;

use pgcrew::db::Conn;
use pgcrew::kernel::RunScope;
use pgcrew::queue::{Enqueued, TaskOutcome, WorkerPoolBuilder};
use pgcrew::runs::{self, NewEvent};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{
    AgentRuntime, Db, Error, InstanceId, Kernel, ModelPort, NewTask, RunId, TaskId, TenantId,
    ToolRegistry,
};
use serde_json::json;

/// A tenant row with a concurrent-task limit (plain SQL, every other column defaulted).
pub async fn create_tenant(db: &Db, id: &str, limit: Option<i32>) -> TenantId {
    let conn = db.get().await.unwrap();
    conn.execute(
        "INSERT INTO pgcrew.tenants (id, max_concurrent_tasks) VALUES ($1, $2)",
        &[&id, &limit],
    )
    .await
    .unwrap();
    TenantId::new(id).unwrap()
}

/// A scratch database with instance `id` registered in it.
pub async fn db_with_instance(id: &str) -> (crate::common::TestDb, InstanceId) {
    let t = crate::common::test_db().await;
    let me = register_instance(&t, id).await;
    (t, me)
}

/// [`db_with_instance`] and a pooled connection to that database.
pub async fn db_with_instance_conn(id: &str) -> (crate::common::TestDb, InstanceId, Conn) {
    let (t, me) = db_with_instance(id).await;
    let conn = t.db.get().await.unwrap();
    (t, me, conn)
}

/// `task` enqueued on `conn` (which must accept it): the task as enqueued.
pub async fn enqueued<E: pgcrew::db::Executor + ?Sized>(conn: &E, task: &NewTask) -> Enqueued {
    pgcrew::queue::enqueue(conn, task).await.unwrap()
}

/// `builder` with a handler for `kind` that records each task's id in `table` (its one
/// `bigint` column) and completes the task.
pub fn recording_handler(
    builder: WorkerPoolBuilder,
    kind: &str,
    table: &'static str,
) -> WorkerPoolBuilder {
    builder.handler(kind, move |ctx, _p: serde_json::Value| async move {
        let conn = ctx.client.db().get().await?;
        conn.execute(&format!("INSERT INTO {table} VALUES ($1)"), &[&ctx.id])
            .await?;
        Ok(TaskOutcome::Complete)
    })
}

/// A scratch database with a tenant (as [`tenant`]) in it.
pub async fn db_with_tenant(
    id: &str,
    caps: &[&str],
    budget: Option<f64>,
) -> (crate::common::TestDb, TenantId) {
    let t = crate::common::test_db().await;
    let tenant = tenant(&t, id, caps, budget).await;
    (t, tenant)
}

/// Run `ddl` (say, the table a test's handlers record their executions in), then enqueue
/// `tasks` in batches of `batch`: the new tasks' ids, in order.
pub async fn setup_and_enqueue(db: &Db, ddl: &str, tasks: &[NewTask], batch: usize) -> Vec<TaskId> {
    let conn = db.get().await.unwrap();
    conn.batch_execute(ddl).await.unwrap();
    let mut ids = Vec::with_capacity(tasks.len());
    for chunk in tasks.chunks(batch) {
        ids.extend(pgcrew::queue::enqueue_many(&conn, chunk).await.unwrap());
    }
    ids
}

/// A run row in ledger format 1 (as every run created before the v2 migration): its row is
/// written with the format chosen before its first append.
pub async fn v1_run(db: &Db) -> RunId {
    let run = RunId::new();
    db.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO pgcrew.runs (id, tenant_id, ledger_format) VALUES ($1, 'default', 1)",
            &[&run],
        )
        .await
        .unwrap();
    run
}

/// A tenant through `tenancy::upsert`, with capabilities and a budget.
pub async fn tenant(db: &Db, id: &str, caps: &[&str], budget: Option<f64>) -> TenantId {
    let ctx = TenantContext::new(id)
        .unwrap()
        .capabilities(caps.iter().copied())
        .budget_usd(budget);
    tenancy::upsert(db, &ctx).await.unwrap();
    ctx.tenant_id
}

/// An instance row for `id`, as if an instance had registered (no process behind it).
pub async fn register_instance(db: &Db, id: &str) -> InstanceId {
    let conn = db.get().await.unwrap();
    conn.execute(
        "INSERT INTO pgcrew.instances (id, hostname, pid, version) VALUES ($1, 'test', 1, 'test')",
        &[&id],
    )
    .await
    .unwrap();
    InstanceId::new(id).unwrap()
}

/// A task of `kind` with an empty JSON object as its arguments.
pub fn task(kind: &str) -> NewTask {
    NewTask::new(kind, &json!({})).unwrap()
}

/// A started run of `tenant`.
pub async fn started_run(db: &Db, tenant: &TenantId) -> RunId {
    let run = runs::create_run(db, runs::NewRun::new(tenant.clone()))
        .await
        .unwrap();
    runs::start_run(db, run, None, None, runs::LimitPolicy::Reject)
        .await
        .unwrap();
    run
}

/// A kernel whose model has nothing scripted (for steps that call no model).
pub fn bare_kernel(db: &Db) -> Kernel {
    Kernel::new(
        db.clone(),
        Arc::new(pgcrew::model::ScriptedModel::sequence(vec![])),
    )
}

/// A started run of tenant `default` with `n` `note` events after its lifecycle events.
pub async fn running_run(db: &Db, n: usize) -> RunId {
    let tenant = TenantId::new("default").unwrap();
    let run = runs::create_run(db, runs::NewRun::new(tenant))
        .await
        .unwrap();
    runs::start_run(db, run, None, None, runs::LimitPolicy::Reject)
        .await
        .unwrap();
    append_notes(db, run, n).await;
    run
}

/// Append `n` `note` events (`{"i": i, "text": "event i"}`, steps `s0`, `s1`, ...) to `run`.
pub async fn append_notes(db: &Db, run: RunId, n: usize) {
    for i in 0..n {
        runs::append_event(
            db,
            run,
            NewEvent::new("note", json!({"i": i, "text": format!("event {i}")}))
                .step(format!("s{i}")),
            None,
        )
        .await
        .unwrap();
    }
}

/// A run row of tenant `default` written with plain SQL (no ledger event): its id.
pub async fn insert_run(db: &Db) -> uuid::Uuid {
    let run_id = uuid::Uuid::new_v4();
    db.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO pgcrew.runs (id, tenant_id) VALUES ($1, 'default')",
            &[&run_id],
        )
        .await
        .unwrap();
    run_id
}

/// An agent runtime named `owner` on a kernel with `model` and `tools`.
pub fn agent_runtime(
    db: &Db,
    model: Arc<dyn ModelPort>,
    tools: ToolRegistry,
    owner: &str,
) -> AgentRuntime {
    AgentRuntime::new(Kernel::new(db.clone(), model).with_tools(tools), owner)
}

/// A new session of `user` for `tenant` on `rt`, and a run of `agent` submitted in it.
pub async fn submit_run(
    rt: &AgentRuntime,
    tenant: &TenantId,
    user: &str,
    agent: &str,
    prompt: &str,
) -> RunId {
    let session = rt.new_session(tenant, user).await.unwrap();
    rt.submit(agent, session.id, prompt).await.unwrap()
}

/// The side-effect table of `pgcrew tasks work --record-effects`: (task id, instance id).
pub async fn create_task_effects(db: &Db) {
    db.get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE pgcrew_task_effects (task_id bigint NOT NULL, instance_id text NOT NULL)",
        )
        .await
        .unwrap();
}

/// `n` tasks of kind `effect` on `queue`.
pub fn effect_tasks(n: usize, queue: &str) -> Vec<NewTask> {
    (0..n).map(|_| task("effect").queue(queue)).collect()
}

/// A started run of `tenant` parked at bare wait step `w/go` for signal `go` (timeout
/// `timeout`) by owner `w0`, which held its lease.
pub async fn parked_run(db: &Db, tenant: &TenantId, timeout: Duration) -> (RunId, i64) {
    let run = started_run(db, tenant).await;
    let lease = runs::acquire_run_lease(db, run, "w0", Duration::from_secs(3600))
        .await
        .unwrap()
        .unwrap();
    let scope = RunScope::new(run, tenant.clone()).with_lease(lease.token);
    let parked = bare_kernel(db)
        .wait_step(&scope, "w/go", "go", timeout, json!({}))
        .await;
    assert!(matches!(parked, Err(Error::Waiting { .. })), "{parked:?}");
    (run, lease.token)
}
