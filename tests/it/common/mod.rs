//! Shared test helpers: a fresh database per test, waiting for conditions, and (in the
//! submodules) client configurations, row factories, `pgcrew` child processes and a
//! checklist-conform deployment.

#![allow(dead_code)]

mod client;
mod deployment;
mod factories;
mod process;

use std::ops::Deref;
use std::time::Duration;

use pgcrew::RunId;
use pgcrew::db::{Db, ScratchDatabase};
use serde_json::Value;

pub use client::{
    fast_config, next_run_state_change, start_client, start_leader, wait_leader, wait_listening,
};
pub use deployment::{DEPLOYMENT_LEDGER_KEY, Deployment, healthy_deployment};
pub use factories::{
    agent_runtime, append_notes, bare_kernel, create_task_effects, create_tenant, db_with_instance,
    db_with_instance_conn, db_with_tenant, effect_tasks, enqueued, insert_run, parked_run,
    recording_handler, register_instance, running_run, setup_and_enqueue, started_run, submit_run,
    task, tenant, v1_run,
};
pub use process::{
    Serve, assert_bench_database_dropped, cli, effect_worker, pgcrew_bin, run_bench, serve,
};

/// A fresh, migrated database for one test, dropped with the returned guard.
pub struct TestDb {
    /// The scratch database (dropped on drop).
    pub scratch: ScratchDatabase,
    /// A pool on it.
    pub db: Db,
}

impl TestDb {
    /// The DSN of the test database.
    pub fn dsn(&self) -> &str {
        self.scratch.dsn()
    }
}

/// A test database stands for its pool wherever a `&Db` is wanted.
impl Deref for TestDb {
    type Target = Db;

    fn deref(&self) -> &Db {
        &self.db
    }
}

/// Create a fresh migrated database.
pub async fn test_db() -> TestDb {
    let scratch = ScratchDatabase::for_tests()
        .await
        .expect("create scratch database (is PostgreSQL installed?)");
    let db = Db::connect(scratch.dsn(), 24, Duration::from_secs(10))
        .await
        .expect("connect to scratch database");
    db.migrate().await.expect("migrate");
    TestDb { scratch, db }
}

/// Poll `f` every 20 ms until it returns true or `timeout` passes; returns whether it did.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Poll `f` (as [`eventually`]) and panic with `what` if it is not true within `timeout`.
#[track_caller]
pub fn wait_until<'a, F, Fut>(
    timeout: Duration,
    what: &'a str,
    f: F,
) -> impl std::future::Future<Output = ()> + 'a
where
    F: FnMut() -> Fut + 'a,
    Fut: std::future::Future<Output = bool> + 'a,
{
    let caller = std::panic::Location::caller();
    async move {
        assert!(
            eventually(timeout, f).await,
            "not within {timeout:?}: {what} (waited at {caller})"
        );
    }
}

/// How `Db::connect` fails on `dsn` (with `pool_size` connections and a 2 s timeout).
pub async fn connect_error(dsn: &str, pool_size: usize) -> pgcrew::Error {
    Db::connect(dsn, pool_size, Duration::from_secs(2))
        .await
        .unwrap_err()
}

/// What `dsn` names: (host, a TCP name or a socket directory; port; user, default `postgres`;
/// password).
pub fn dsn_parts(dsn: &str) -> (String, u16, String, Option<String>) {
    let cfg = pgcrew::db::parse_dsn(dsn).unwrap();
    let host = match &cfg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    let user = cfg.get_user().unwrap_or("postgres").to_string();
    let password = cfg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    (host, cfg.get_ports()[0], user, password)
}

/// Lock the leader row in `tx` with `lock` (`FOR SHARE`, `FOR UPDATE`), as a long statement
/// would: renewals wait on it until `tx` ends.
pub async fn lock_leader_row(tx: &tokio_postgres::Transaction<'_>, lock: &str) {
    let sql = format!("SELECT 1 FROM pgcrew.leader WHERE name = 'default' {lock}");
    tx.execute(&sql, &[]).await.unwrap();
}

/// Execute `sql` with `params` on a connection of `db`; the number of rows it touched.
pub async fn execute(
    db: &Db,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> u64 {
    db.get().await.unwrap().execute(sql, params).await.unwrap()
}

/// Cancel task `id`: the state `queue::cancel` reports.
pub async fn cancel_task(db: &Db, id: pgcrew::TaskId) -> pgcrew::queue::TaskState {
    let conn = db.get().await.unwrap();
    pgcrew::queue::cancel(&conn, id).await.unwrap()
}

/// Retry task `id`: the state `queue::retry` reports.
pub async fn retry_task(db: &Db, id: pgcrew::TaskId) -> pgcrew::queue::TaskState {
    let conn = db.get().await.unwrap();
    pgcrew::queue::retry(&conn, id).await.unwrap()
}

/// The single `int8` value `sql` returns.
pub async fn scalar(db: &Db, sql: &str) -> i64 {
    scalar_on(&db.get().await.unwrap(), sql).await
}

/// Every row `sql` returns on a connection of `db`, each mapped by `f`.
pub async fn rows_of<T>(db: &Db, sql: &str, f: impl Fn(&tokio_postgres::Row) -> T) -> Vec<T> {
    let conn = db.get().await.unwrap();
    conn.query(sql, &[]).await.unwrap().iter().map(f).collect()
}

/// The first column of every row `sql` returns on the connection `conn`.
pub async fn first_column<T, C>(conn: &tokio_postgres::Client, sql: &str) -> C
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
    C: FromIterator<T>,
{
    conn.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The first two columns of every row `sql` returns on the connection `conn`.
pub async fn first_two_columns<A, B, C>(conn: &tokio_postgres::Client, sql: &str) -> C
where
    A: for<'a> tokio_postgres::types::FromSql<'a>,
    B: for<'a> tokio_postgres::types::FromSql<'a>,
    C: FromIterator<(A, B)>,
{
    conn.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The single `int8` value `sql` returns on the connection `conn`.
pub async fn scalar_on(conn: &tokio_postgres::Client, sql: &str) -> i64 {
    value_on(conn, sql, 0).await
}

/// Column `column` of the single row `sql` returns on the connection `conn`.
pub async fn value_on<T>(conn: &tokio_postgres::Client, sql: &str, column: usize) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    conn.query_one(sql, &[]).await.unwrap().get(column)
}

/// How many tasks are not completed (for [`wait_for`]).
pub const OPEN_TASKS: &str = "SELECT count(*) FROM pgcrew.tasks WHERE state <> 'completed'";

/// How many tasks are completed (for [`wait_for`]).
pub const COMPLETED_TASKS: &str = "SELECT count(*) FROM pgcrew.tasks WHERE state = 'completed'";

/// How many tasks are running (for [`wait_for`]).
pub const RUNNING_TASKS: &str = "SELECT count(*) FROM pgcrew.tasks WHERE state = 'running'";

/// Wait on the single `int8` value of `sql`:
/// `wait_for(db, sql).within(timeout).until(|n| n == 0, "what it means").await`.
pub fn wait_for<'a>(db: &'a Db, sql: &'a str) -> ScalarWait<'a> {
    ScalarWait {
        db,
        sql,
        timeout: Duration::from_secs(10),
    }
}

/// A wait on a query's value (see [`wait_for`]).
pub struct ScalarWait<'a> {
    db: &'a Db,
    sql: &'a str,
    timeout: Duration,
}

impl ScalarWait<'_> {
    /// How long to wait (default 10 s).
    pub fn within(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    /// Poll (as [`eventually`]) until the value satisfies `ok`; otherwise panic with `what`,
    /// the query and its last value.
    #[track_caller]
    pub fn until(
        self,
        ok: impl Fn(i64) -> bool,
        what: &str,
    ) -> impl std::future::Future<Output = ()> {
        let caller = std::panic::Location::caller();
        async move {
            let last = std::cell::Cell::new(None);
            let met = eventually(self.timeout, || async {
                let n = scalar(self.db, self.sql).await;
                last.set(Some(n));
                ok(n)
            })
            .await;
            assert!(
                met,
                "{what} (not within {:?}: `{}`, last value {:?}, waited at {caller})",
                self.timeout,
                self.sql,
                last.get()
            );
        }
    }
}

/// A run's ledger events as (type, step key, payload), in order.
pub async fn ledger_events(db: &Db, run: RunId) -> Vec<(String, Option<String>, Value)> {
    pgcrew::runs::read_events(db, run, 0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event_type, e.step_key, e.payload))
        .collect()
}

/// How many of `evs` (see [`ledger_events`]) are of type `ty`.
pub fn count(evs: &[(String, Option<String>, Value)], ty: &str) -> usize {
    evs.iter().filter(|(t, _, _)| t == ty).count()
}

/// Every one of `needles` is in `text`.
#[track_caller]
pub fn assert_contains_all(text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(text.contains(needle), "`{needle}` missing from: {text}");
    }
}

/// `err` is `Error::InvalidInput` for `field`.
#[track_caller]
pub fn assert_invalid_input(err: &pgcrew::Error, field: &str) {
    assert!(
        matches!(err, pgcrew::Error::InvalidInput { field: f, .. } if *f == field),
        "{err}"
    );
}

/// A throwaway cluster of the test's own (its roles, pg_hba.conf and pg_stat_activity are the
/// test's alone) and a DSN for its `postgres` database.
pub async fn own_cluster(
    options: pgcrew::db::TempClusterOptions,
) -> (pgcrew::db::TempCluster, String) {
    let cluster = tokio::task::spawn_blocking(move || pgcrew::db::TempCluster::start_with(options))
        .await
        .expect("cluster start task")
        .expect("start a throwaway cluster (is PostgreSQL installed?)");
    let dsn = cluster.dsn();
    (cluster, dsn)
}

/// A throwaway cluster with `pg_stat_statements` loaded (`PGCREW_TEST_CLUSTER_PORT` fixes its
/// port; default a free one), a migrated scratch database `name` on it with the extension
/// created, and a four-connection pool to that database: for tests that count statements.
pub async fn statements_db(name: &str) -> (pgcrew::db::TempCluster, ScratchDatabase, Db) {
    let (cluster, dsn) = own_cluster(pgcrew::db::TempClusterOptions {
        settings: vec![(
            "shared_preload_libraries".into(),
            "pg_stat_statements".into(),
        )],
        port: std::env::var("PGCREW_TEST_CLUSTER_PORT")
            .ok()
            .and_then(|p| p.parse().ok()),
        ..Default::default()
    })
    .await;
    let scratch = ScratchDatabase::create(&dsn, name).await.unwrap();
    let db = Db::connect(scratch.dsn(), 4, Duration::from_secs(5))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    db.get()
        .await
        .unwrap()
        .batch_execute("CREATE EXTENSION pg_stat_statements")
        .await
        .unwrap();
    (cluster, scratch, db)
}

/// Forget the statements `pg_stat_statements` has counted so far (every database's).
pub async fn reset_statements(db: &Db) {
    db.get()
        .await
        .unwrap()
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await
        .unwrap();
}

/// Claim statements since the last reset of `pg_stat_statements`: (fast claims, general
/// claims `pgcrew.claim_tasks`).
pub async fn claim_statements(db: &Db) -> (i64, i64) {
    let conn = db.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT coalesce(sum(s.calls) FILTER (WHERE s.query LIKE '%pgcrew.claim_fast%'), 0)::bigint, \
                    coalesce(sum(s.calls) FILTER (WHERE s.query LIKE '%pgcrew.claim_tasks(%'), 0)::bigint \
               FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
              WHERE d.datname = current_database() AND s.query NOT LIKE '%pg_stat_statements%'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Whether pgbouncer is installed. Missing, it is a failure when PGCREW_REQUIRE_FAULT_TOOLS is
/// set (CI), and otherwise a loud message: the caller skips its test.
pub fn pgbouncer_installed() -> bool {
    if pgcrew::db::TempPgBouncer::binary().is_some() {
        return true;
    }
    if std::env::var_os("PGCREW_REQUIRE_FAULT_TOOLS").is_some() {
        panic!("pgbouncer is not installed (apt-get install pgbouncer)");
    }
    eprintln!(
        "\n*** SKIPPED: pgbouncer is not installed (apt-get install pgbouncer); \
         set PGCREW_REQUIRE_FAULT_TOOLS=1 to make this a failure ***\n"
    );
    false
}

/// A session's messages: every planning of one of its statements arrives as a LOG line
/// (`log_planner_stats`, `client_min_messages = log`).
pub type Notes = tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>;

/// A dedicated session to `db`'s database that reports every planning of one of its
/// statements as a LOG line (`log_planner_stats`), read with [`drain`] and [`planned`].
pub async fn planner_session(
    db: &Db,
) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>, Notes) {
    let (c, driver, notes) = Db::connect_dedicated(db.config()).await.unwrap();
    c.batch_execute("SET log_planner_stats = on; SET client_min_messages = log")
        .await
        .unwrap();
    (c, driver, notes)
}

/// The statement PL/pgSQL function `function` runs (`RETURN QUERY ...;`), as the database holds
/// it, with each of its arguments replaced by the text it is paired with in `args` (in order:
/// a name that is a prefix of another comes after it).
pub async fn function_statement(db: &Db, function: &str, args: &[(&str, &str)]) -> String {
    let src: String = value_on(
        &db.get().await.unwrap(),
        &format!("SELECT prosrc FROM pg_proc WHERE oid = '{function}'::regproc"),
        0,
    )
    .await;
    let start = src
        .find("RETURN QUERY")
        .unwrap_or_else(|| panic!("RETURN QUERY in {function}"))
        + "RETURN QUERY".len();
    let end = src
        .rfind("END")
        .unwrap_or_else(|| panic!("END in {function}"));
    let mut body = src[start..end].trim().trim_end_matches(';').to_string();
    for (arg, with) in args {
        body = body.replace(arg, with);
    }
    body
}

/// Forget what the session has reported so far.
pub fn drain(notes: &mut Notes) {
    while notes.try_recv().is_ok() {}
}

/// Statements planned since the last look: the planner's statistics lines among the messages.
pub fn planned(notes: &mut Notes) -> usize {
    let mut n = 0;
    while let Ok(m) = notes.try_recv() {
        if matches!(&m, tokio_postgres::AsyncMessage::Notice(notice)
                if notice.message() == "PLANNER STATISTICS")
        {
            n += 1;
        }
    }
    n
}

/// A throwaway cluster ([`pgcrew::db::TempCluster::start`]) with a migrated scratch database
/// `name` on it and a four-connection pool to that database.
pub async fn cluster_db(name: &str) -> (pgcrew::db::TempCluster, ScratchDatabase, Db) {
    let cluster = tokio::task::spawn_blocking(pgcrew::db::TempCluster::start)
        .await
        .unwrap()
        .unwrap();
    let scratch = ScratchDatabase::create(&cluster.dsn(), name).await.unwrap();
    let db = Db::connect(scratch.dsn(), 4, Duration::from_secs(2))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    (cluster, scratch, db)
}
