//! One way to the database: the same public function on the pool (`&db`), a pooled connection
//! (`&conn`) and a transaction (`&tx`); work done in a transaction commits and rolls back with
//! it; a handle joined to a transaction brings its settings.

use pgcrew::db::{Acquire, Db, Executor, sql_type_of};
use pgcrew::ledger_key::LedgerKey;
use pgcrew::runs::{self, NewEvent, NewRun};
use pgcrew::tenancy::{self, ReserveRequest, TenantContext};
use pgcrew::{Error, RunId, TenantId};
use serde_json::json;
use tokio_postgres::types::{ToSql, Type};

use crate::common::test_db;

fn default_tenant() -> TenantId {
    TenantId::new("default").unwrap()
}

/// `count(*)` of `sql` (one `$1`: the run) through the executor itself.
async fn count_for<E: Executor + ?Sized>(on: &E, sql: &str, run: RunId) -> i64 {
    let params: &[(&(dyn ToSql + Sync), Type)] = &[(&run, sql_type_of(&run))];
    on.query_one(sql, params).await.unwrap().get(0)
}

/// Events of `run`, counted through the executor itself.
async fn events<E: Executor + ?Sized>(on: &E, run: RunId) -> i64 {
    count_for(
        on,
        "SELECT count(*) FROM pgcrew.events WHERE run_id = $1",
        run,
    )
    .await
}

/// A new run of the default tenant, created through `on`.
async fn new_run<E: Acquire + ?Sized>(on: &E) -> RunId {
    runs::create_run(on, NewRun::new(default_tenant()))
        .await
        .unwrap()
}

/// Append one event of type `ty` to `run` through `on`.
async fn note<E: Executor + ?Sized>(on: &E, run: RunId, ty: &str, n: i64) {
    runs::append_event(on, run, NewEvent::new(ty, json!(n)), None)
        .await
        .unwrap();
}

async fn reserved(db: &Db, tenant: &TenantId) -> f64 {
    tenancy::get(db, tenant).await.unwrap().reserved_usd
}

#[tokio::test]
async fn the_same_functions_run_on_the_pool_a_connection_and_a_transaction() {
    let t = test_db().await;
    let db = &t.db;
    // The pool.
    let run = new_run(db).await;
    note(db, run, "on_db", 1).await;
    assert_eq!(events(db, run).await, 2);
    // A pooled connection.
    let conn = db.get().await.unwrap();
    note(&conn, run, "on_conn", 2).await;
    assert_eq!(events(&conn, run).await, 3);
    drop(conn);
    // A pooled transaction, committed: the run and its events exist afterwards.
    let mut conn = db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let in_tx = new_run(&tx).await;
    note(&tx, in_tx, "on_tx", 3).await;
    note(&tx, run, "on_tx", 4).await;
    assert_eq!(events(&tx, in_tx).await, 2);
    tx.commit().await.unwrap();
    drop(conn);
    assert_eq!(events(db, in_tx).await, 2);
    assert_eq!(events(db, run).await, 4);
    // A plain tokio-postgres transaction works as well.
    let mut conn = db.get().await.unwrap();
    let plain: &mut tokio_postgres::Client = &mut conn;
    let tx = plain.transaction().await.unwrap();
    note(&tx, run, "on_plain_tx", 5).await;
    tx.commit().await.unwrap();
    assert_eq!(events(db, run).await, 5);
}

#[tokio::test]
async fn work_in_a_transaction_rolls_back_with_it() {
    let t = test_db().await;
    let db = &t.db;
    let acme = TenantContext::new("acme").unwrap().budget_usd(Some(10.0));
    tenancy::upsert(db, &acme).await.unwrap();
    let run = new_run(db).await;

    let mut conn = db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let created = new_run(&tx).await;
    note(&tx, run, "gone", 1).await;
    runs::fail_run(&tx, run, "boom", "it broke", None)
        .await
        .unwrap();
    tenancy::reserve(&tx, &ReserveRequest::new(acme.tenant_id.clone(), 4.0))
        .await
        .unwrap();
    // Inside the transaction all of it is visible ...
    assert_eq!(events(&tx, run).await, 3);
    assert_eq!(
        runs::get_run(db, run).await.unwrap().state,
        runs::RunState::Pending
    );
    tx.rollback().await.unwrap();
    drop(conn);
    // ... and none of it after the rollback.
    assert!(matches!(
        runs::get_run(db, created).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(events(db, run).await, 1);
    assert_eq!(
        runs::get_run(db, run).await.unwrap().state,
        runs::RunState::Pending
    );
    assert_eq!(reserved(db, &acme.tenant_id).await, 0.0);

    // On the pool the same calls commit on their own.
    tenancy::reserve(db, &ReserveRequest::new(acme.tenant_id.clone(), 4.0))
        .await
        .unwrap();
    assert_eq!(reserved(db, &acme.tenant_id).await, 4.0);
    // A refused reservation on the pool leaves nothing behind (its own transaction rolled back).
    let err = tenancy::reserve(db, &ReserveRequest::new(acme.tenant_id.clone(), 7.0))
        .await
        .unwrap_err();
    assert!(err.is_budget_exceeded());
    assert_eq!(reserved(db, &acme.tenant_id).await, 4.0);
}

#[tokio::test]
async fn an_atomic_unit_commits_or_rolls_back_as_one() {
    let t = test_db().await;
    let db = &t.db;
    // A unit begun on the pool: dropped without commit, nothing stays.
    let run = {
        let mut conn = db.acquire().await.unwrap();
        let tx = conn.begin().await.unwrap();
        assert!(tx.is_own());
        let run = new_run(&tx).await;
        note(&tx, run, "x", 1).await;
        assert_eq!(events(&tx, run).await, 2);
        run
    };
    assert!(matches!(
        runs::get_run(db, run).await,
        Err(Error::NotFound { .. })
    ));
    // Committed, it all stays.
    let mut conn = db.acquire().await.unwrap();
    let tx = conn.begin().await.unwrap();
    let run = new_run(&tx).await;
    runs::start_run(&tx, run, None, None, runs::LimitPolicy::Reject)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        runs::get_run(db, run).await.unwrap().state,
        runs::RunState::Running
    );
    assert_eq!(events(db, run).await, 2);
}

#[tokio::test]
async fn a_joined_handle_signs_inside_the_callers_transaction() {
    let t = test_db().await;
    let key = LedgerKey::new([7u8; 32]).unwrap();
    let keyed = t.db.clone().with_ledger_key(key.clone());
    let checkpoints = |run: RunId| {
        let db = t.db.clone();
        async move {
            let sql = "SELECT count(*) FROM pgcrew.ledger_checkpoints WHERE run_id = $1 AND final";
            count_for(&db, sql, run).await
        }
    };
    // A bare transaction carries no key: the final head stays unsigned.
    let bare = runs::create_run(&t.db, NewRun::new(default_tenant()))
        .await
        .unwrap();
    let joined = runs::create_run(&t.db, NewRun::new(default_tenant()))
        .await
        .unwrap();
    let mut conn = t.db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    runs::fail_run(&tx, bare, "boom", "bare", None)
        .await
        .unwrap();
    runs::fail_run(&keyed.join(&tx), joined, "boom", "joined", None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(checkpoints(bare).await, 0);
    assert_eq!(checkpoints(joined).await, 1);
}
