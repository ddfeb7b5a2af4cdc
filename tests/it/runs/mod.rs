//! Runs, sessions, the hash-chained ledger, leases, cancellation, artifacts, summaries, the run
//! CLI — against a real PostgreSQL.

mod admission;
mod ledger;
mod lifecycle;
mod reading;

use std::time::Duration;

use futures_util::StreamExt;
use pgcrew::db::Db;
use pgcrew::runs::{
    self, LimitPolicy, NewEvent, NewRun, RunOutcome, RunState, StartOutcome, SummaryContent,
};
use pgcrew::{Client, ClientConfig, Error, InstanceId, RunId, TenantId};
use serde_json::json;

use crate::common::{TestDb, append_notes, cli, execute, pgcrew_bin, test_db, wait_listening};

fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

async fn add_tenant(db: &Db, id: &str, max_runs: Option<i32>) {
    execute(
        db,
        "INSERT INTO pgcrew.tenants (id, max_concurrent_runs) VALUES ($1, $2)",
        &[&id, &max_runs],
    )
    .await;
}

/// Append one `ty` event with payload `{"w": w, "i": i}` (writer `w`'s `i`th) to `run`.
async fn append_from_writer(db: &Db, run: RunId, ty: &str, w: usize, i: usize) {
    let event = NewEvent::new(ty, json!({"w": w, "i": i}));
    runs::append_event(db, run, event, None).await.unwrap();
}

async fn new_run(db: &Db) -> RunId {
    runs::create_run(db, NewRun::new(tenant("default")).agent("tester"))
        .await
        .unwrap()
}

/// A scratch database with one [`new_run`] in it.
async fn db_with_run() -> (TestDb, RunId) {
    let t = test_db().await;
    let run = new_run(&t.db).await;
    (t, run)
}

async fn run_with_events(db: &Db, n: usize) -> RunId {
    let run = new_run(db).await;
    append_notes(db, run, n).await;
    run
}

async fn exec(db: &Db, sql: &str, run: RunId) {
    db.get().await.unwrap().execute(sql, &[&run]).await.unwrap();
}

async fn both_verifiers(db: &Db, run: RunId) -> (Option<i64>, Option<i64>) {
    let rust = runs::verify_run_chain(db, run).await.unwrap();
    let sql = runs::verify_run_chain_sql(db, run).await.unwrap();
    assert_eq!(rust.valid, rust.first_bad_seq.is_none());
    assert_eq!(sql.valid, sql.first_bad_seq.is_none());
    (rust.first_bad_seq, sql.first_bad_seq)
}

async fn started_client(db: &Db) -> Client {
    let config = ClientConfig::builder()
        .notify_poll_interval(Duration::from_secs(30))
        .leader_election(false)
        .build()
        .unwrap();
    let client = Client::connect(db.clone(), config).await.unwrap();
    client.start().await.unwrap();
    wait_listening(&client, Duration::from_secs(10)).await;
    client
}
