//! Issue #15, runs part: "every promise holds at the edges". Limits on every stored run input
//! (library and SQL), retention of finished runs (anchors, final checkpoints and cost totals
//! kept), and artifacts/summaries written under the run lease and never to finished runs.
//!
//! The `sql_*` tests use the SQL surface only (they compile and ran red against the code before
//! the fix); the others use the library API this issue added.

use std::sync::Arc;
use std::time::Duration;

use pgcrew::coord::maintenance::{MaintenanceContext, MaintenanceStep};
use pgcrew::db::Db;
use pgcrew::runs::{self, NewEvent, NewRun, RunLimits, RunOutcome, SummaryContent};
use pgcrew::{ClientConfig, Error, InstanceId, LedgerKey, RunId, TenantId};
use serde_json::json;

use crate::common::{execute, first_column, scalar_on, test_db};

const MIB: usize = 1 << 20;

fn tenant() -> TenantId {
    TenantId::new("default").unwrap()
}

async fn new_run(db: &Db) -> RunId {
    runs::create_run(db, NewRun::new(tenant()).agent("edges"))
        .await
        .unwrap()
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// Executing `sql` with `params` on `conn` fails as oversized (SQLSTATE PC040).
async fn refused_as_oversized(
    conn: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) {
    let err = conn.execute(sql, params).await.unwrap_err();
    assert_eq!(sqlstate(&err), "PC040", "{err:?}");
}

async fn count(db: &Db, sql: &str, run: RunId) -> i64 {
    db.get()
        .await
        .unwrap()
        .query_one(sql, &[&run])
        .await
        .unwrap()
        .get(0)
}

async fn events_of(db: &Db, run: RunId) -> i64 {
    count(
        db,
        "SELECT count(*) FROM pgcrew.events WHERE run_id = $1",
        run,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// 1. Unbounded inputs
// ---------------------------------------------------------------------------------------------

/// The SQL surface refuses oversized inputs with PC040 and stores nothing.
#[tokio::test]
async fn sql_append_events_refuses_oversized_inputs() {
    let t = test_db().await;
    let run = new_run(&t.db).await;
    let before = events_of(&t.db, run).await;
    let conn = t.db.get().await.unwrap();
    let big = json!({ "blob": "x".repeat(MIB + 10) });
    let small = json!({ "ok": 1 });
    // An oversized payload, alone and after a good event in the same batch.
    for payloads in [vec![big.clone()], vec![small.clone(), big.clone()]] {
        let n = payloads.len();
        let types = vec!["note".to_string(); n];
        let keys: Vec<Option<String>> = vec![None; n];
        let dedupe = vec![false; n];
        let err = conn
            .query(
                "SELECT * FROM pgcrew.append_events($1, NULL, $2, $3, $4, $5)",
                &[&run, &types, &keys, &payloads, &dedupe],
            )
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err), "PC040", "{err:?}");
    }
    // Event type and step key over their limits (the library already refused them).
    for (ty, key) in [
        ("t".repeat(129), None),
        ("note".to_string(), Some("k".repeat(513))),
    ] {
        let err = conn
            .query(
                "SELECT * FROM pgcrew.append_events($1, NULL, ARRAY[$2::text], ARRAY[$3::text], ARRAY['{}'::jsonb], ARRAY[false])",
                &[&run, &ty, &key],
            )
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err), "PC040", "{err:?}");
    }
    assert_eq!(events_of(&t.db, run).await, before, "nothing was stored");
    // At the cap is fine.
    conn.query(
        "SELECT * FROM pgcrew.append_events($1, NULL, ARRAY['note'], ARRAY[NULL::text], ARRAY[$2::jsonb], ARRAY[false])",
        &[&run, &json!("y".repeat(MIB - 2))],
    )
    .await
    .unwrap();
    assert_eq!(events_of(&t.db, run).await, before + 1);
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
}

/// Artifacts, summaries and run inputs are capped in the tables too (trigger + CHECK).
#[tokio::test]
async fn sql_artifacts_summaries_and_runs_refuse_oversized_values() {
    let t = test_db().await;
    let run = new_run(&t.db).await;
    let conn = t.db.get().await.unwrap();
    let big = json!("z".repeat(MIB + 1));
    refused_as_oversized(
        &conn,
        "INSERT INTO pgcrew.artifacts (run_id, key, version, value) VALUES ($1, 'k', 1, $2)",
        &[&run, &big],
    )
    .await;
    refused_as_oversized(
        &conn,
        "INSERT INTO pgcrew.summaries (run_id, summary_type, content_text) VALUES ($1, 's', $2)",
        &[&run, &"z".repeat(MIB + 1)],
    )
    .await;
    refused_as_oversized(
        &conn,
        "INSERT INTO pgcrew.summaries (run_id, summary_type, content_json) VALUES ($1, 's', $2)",
        &[&run, &big],
    )
    .await;
    refused_as_oversized(
        &conn,
        "INSERT INTO pgcrew.runs (id, tenant_id, prompt) VALUES (gen_random_uuid(), 'default', $1)",
        &[&"p".repeat(MIB + 1)],
    )
    .await;
    assert_eq!(
        count(
            &t.db,
            "SELECT (SELECT count(*) FROM pgcrew.artifacts WHERE run_id = $1) + (SELECT count(*) FROM pgcrew.summaries WHERE run_id = $1)",
            run
        )
        .await,
        0
    );
    // The caps are also CHECK constraints on the tables.
    let checks = scalar_on(&conn, "SELECT count(*) FROM pg_constraint WHERE conname IN ('artifacts_value_size', 'summaries_content_size') AND contype = 'c'").await;
    assert_eq!(checks, 2);
}

/// The library refuses oversized inputs with a typed error before sending them, at its
/// configured (lower) limits or the hard caps, and nothing is stored.
#[tokio::test]
async fn library_limits_are_typed_and_configurable() {
    let t = test_db().await;
    let run = new_run(&t.db).await;
    let before = events_of(&t.db, run).await;
    let big = json!("x".repeat(MIB + 1));
    assert!(matches!(
        runs::append_event(&t.db, run, NewEvent::new("note", big.clone()), None).await,
        Err(Error::TooLarge { ref field, .. }) if field == "event payload"
    ));
    assert!(matches!(
        runs::append_events(
            &t.db,
            run,
            &[
                NewEvent::new("note", json!(1)),
                NewEvent::new("note", big.clone())
            ],
            None
        )
        .await,
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        runs::put_artifact(&t.db, run, "k", big.clone(), None).await,
        Err(Error::TooLarge { ref field, .. }) if field == "artifact value"
    ));
    assert!(matches!(
        runs::add_summary(&t.db, run, "s", SummaryContent::Json(big.clone()), None).await,
        Err(Error::TooLarge { ref field, .. }) if field == "summary content"
    ));
    assert!(matches!(
        runs::add_summary(
            &t.db,
            run,
            "s",
            SummaryContent::Text("x".repeat(MIB + 1)),
            None
        )
        .await,
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        runs::create_run(&t.db, NewRun::new(tenant()).prompt("p".repeat(MIB + 1))).await,
        Err(Error::TooLarge { ref field, .. }) if field == "run prompt"
    ));
    // Under the library cap but over the database's (jsonb text adds a space after each ':'):
    // the database refuses it with the same typed error.
    let spaced: serde_json::Map<String, serde_json::Value> =
        (0..90_000).map(|i| (format!("{i:06}"), json!(0))).collect();
    let spaced = serde_json::Value::Object(spaced);
    assert!(serde_json::to_string(&spaced).unwrap().len() <= MIB);
    assert!(matches!(
        runs::append_event(&t.db, run, NewEvent::new("note", spaced), None).await,
        Err(Error::TooLarge { ref field, limit, .. }) if field == "event payload" && limit == MIB as u64
    ));
    assert_eq!(events_of(&t.db, run).await, before);
    // A lower limit on the handle.
    let small =
        t.db.clone()
            .with_run_limits(RunLimits {
                max_event_payload_bytes: 100,
                max_artifact_bytes: 50,
                max_summary_bytes: 10,
            })
            .unwrap();
    assert!(matches!(
        runs::append_event(
            &small,
            run,
            NewEvent::new("note", json!("a".repeat(99))),
            None
        )
        .await,
        Err(Error::TooLarge {
            size: 101,
            limit: 100,
            ..
        })
    ));
    runs::append_event(
        &small,
        run,
        NewEvent::new("note", json!("a".repeat(98))),
        None,
    )
    .await
    .unwrap();
    assert!(matches!(
        runs::put_artifact(&small, run, "k", json!("a".repeat(60)), None).await,
        Err(Error::TooLarge { limit: 50, .. })
    ));
    assert!(matches!(
        runs::add_summary(&small, run, "s", SummaryContent::Text("a".repeat(11)), None).await,
        Err(Error::TooLarge { limit: 10, .. })
    ));
    runs::add_summary(&small, run, "s", SummaryContent::Text("a".repeat(10)), None)
        .await
        .unwrap();
    // Never above the hard cap, on the handle or in the client configuration.
    let too_high = RunLimits {
        max_event_payload_bytes: MIB + 1,
        ..RunLimits::default()
    };
    assert!(matches!(
        t.db.clone().with_run_limits(too_high),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        ClientConfig::builder().run_limits(too_high).build(),
        Err(Error::Config(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// 3. Artifacts and summaries: the run lease, finished runs
// ---------------------------------------------------------------------------------------------

/// Raw SQL cannot add artifacts or summaries to a finished run.
#[tokio::test]
async fn sql_finished_runs_refuse_artifacts_and_summaries() {
    let t = test_db().await;
    let run = new_run(&t.db).await;
    runs::cancel_run(&t.db, run, "done").await.unwrap();
    let conn = t.db.get().await.unwrap();
    for sql in [
        "INSERT INTO pgcrew.artifacts (run_id, key, version, value) VALUES ($1, 'k', 1, '1')",
        "INSERT INTO pgcrew.summaries (run_id, summary_type, content_text) VALUES ($1, 's', 'x')",
    ] {
        let err = conn.execute(sql, &[&run]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "PC041", "{sql}: {err:?}");
    }
}

/// Artifacts and summaries carry the run lease token and are refused on finished runs.
#[tokio::test]
async fn artifacts_and_summaries_need_the_lease_and_an_open_run() {
    let t = test_db().await;
    let run = new_run(&t.db).await;
    let lease = runs::acquire_run_lease(&t.db, run, "worker-a", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let summary = |text: &str, token| {
        runs::add_summary(&t.db, run, "s", SummaryContent::Text(text.into()), token)
    };
    runs::put_artifact(&t.db, run, "plan", json!(1), Some(lease.token))
        .await
        .unwrap();
    summary("a", Some(lease.token)).await.unwrap();
    // A stale token.
    assert!(matches!(
        runs::put_artifact(&t.db, run, "plan", json!(2), Some(lease.token - 1)).await,
        Err(Error::LeaseLost(_))
    ));
    assert!(matches!(
        summary("b", Some(lease.token + 1)).await,
        Err(Error::LeaseLost(_))
    ));
    // The lease released: the old token no longer writes.
    assert!(runs::release_run_lease(&t.db, &lease).await.unwrap());
    assert!(matches!(
        runs::put_artifact(&t.db, run, "plan", json!(3), Some(lease.token)).await,
        Err(Error::LeaseLost(_))
    ));
    assert!(matches!(
        summary("c", Some(lease.token)).await,
        Err(Error::LeaseLost(_))
    ));
    // An expired lease.
    let short = runs::acquire_run_lease(&t.db, run, "worker-b", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let conn = t.db.get().await.unwrap();
    conn.execute(
        "UPDATE pgcrew.runs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        &[&run],
    )
    .await
    .unwrap();
    assert!(matches!(
        runs::put_artifact(&t.db, run, "plan", json!(4), Some(short.token)).await,
        Err(Error::LeaseLost(_))
    ));
    let hist = runs::artifact_history(&t.db, run, "plan").await.unwrap();
    assert_eq!(
        hist.len(),
        1,
        "only the write under the live lease was stored"
    );
    // Finished: refused with or without a token.
    runs::cancel_run(&t.db, run, "done").await.unwrap();
    for token in [None, Some(short.token)] {
        assert!(matches!(
            runs::put_artifact(&t.db, run, "plan", json!(5), token).await,
            Err(Error::RunFinished { ref state, .. }) if state == "cancelled"
        ));
        assert!(matches!(
            summary("d", token).await,
            Err(Error::RunFinished { .. })
        ));
    }
    // An unknown run.
    assert!(matches!(
        runs::put_artifact(&t.db, RunId::new(), "plan", json!(1), None).await,
        Err(Error::NotFound { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// 2. Growth: retention of finished runs
// ---------------------------------------------------------------------------------------------

const KEY: [u8; 32] = [0x33; 32];

fn ctx(config: ClientConfig) -> MaintenanceContext {
    MaintenanceContext {
        config: Arc::new(config),
        instance_id: InstanceId::new("leader").unwrap(),
        lease: "pgcrew".into(),
        term: 1,
    }
}

async fn retention_pass(db: &Db, config: &ClientConfig) -> u64 {
    let mut conn = db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let n = runs::RunRetention
        .run(&tx, &ctx(config.clone()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    n
}

/// A new run, started under a 60 s lease of owner `w`: the run and its lease.
async fn started_run(db: &Db) -> (RunId, runs::RunLease) {
    let run = new_run(db).await;
    let lease = runs::acquire_run_lease(db, run, "w", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    runs::start_run(
        db,
        run,
        None,
        Some(lease.token),
        runs::LimitPolicy::StayPending,
    )
    .await
    .unwrap();
    (run, lease)
}

/// A run with events, artifacts, summaries and cost entries (on two days), finished through a
/// keyed handle (intermediate and final checkpoints), finalized `age_days` ago.
async fn finished_run(db: &Db, age_days: i32) -> RunId {
    let (run, lease) = started_run(db).await;
    for i in 0..5 {
        runs::append_event(
            db,
            run,
            NewEvent::new("note", json!({ "i": i })),
            Some(lease.token),
        )
        .await
        .unwrap();
    }
    runs::put_artifact(db, run, "a", json!({"v": 1}), Some(lease.token))
        .await
        .unwrap();
    runs::add_summary(
        db,
        run,
        "s",
        SummaryContent::Text("sum".into()),
        Some(lease.token),
    )
    .await
    .unwrap();
    add_costs(db, Some(run)).await;
    runs::complete_run(db, run, RunOutcome::default(), Some(lease.token))
        .await
        .unwrap();
    execute(
        db,
        "UPDATE pgcrew.runs SET finalized_at = now() - make_interval(days => $2) WHERE id = $1",
        &[&run, &age_days],
    )
    .await;
    run
}

async fn add_costs(db: &Db, run: Option<RunId>) {
    execute(db, "INSERT INTO pgcrew.cost_entries (tenant_id, run_id, category, model, prompt_tokens, completion_tokens, cost_usd, created_at)
             VALUES ('default', $1, 'llm', 'gpt', 10, 5, 0.0123456789, now() - interval '3 days'),
                    ('default', $1, 'llm', 'gpt', 1, 2, 0.5, now() - interval '3 days'),
                    ('default', $1, 'tool', NULL, 0, 0, 0.25, now())", &[&run]).await;
}

async fn tenant_costs(db: &Db) -> Vec<String> {
    first_column(
        &db.get().await.unwrap(),
        "SELECT row(t.*)::text FROM pgcrew.tenant_costs t ORDER BY tenant_id, day, category, model",
    )
    .await
}

/// The default tenant's spending, as text.
async fn default_spent(conn: &tokio_postgres::Client) -> String {
    let sql = "SELECT spent_usd::text FROM pgcrew.tenants WHERE id = 'default'";
    conn.query_one(sql, &[]).await.unwrap().get(0)
}

async fn stored(db: &Db, run: RunId) -> (i64, i64, i64, i64) {
    let row = db
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT (SELECT count(*) FROM pgcrew.events WHERE run_id = $1),
                    (SELECT count(*) FROM pgcrew.artifacts WHERE run_id = $1),
                    (SELECT count(*) FROM pgcrew.summaries WHERE run_id = $1),
                    (SELECT count(*) FROM pgcrew.cost_entries WHERE run_id = $1)",
            &[&run],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

#[tokio::test]
async fn run_retention_is_off_by_default() {
    let t = test_db().await;
    let db =
        t.db.clone()
            .with_ledger_key(LedgerKey::new(KEY).unwrap())
            .with_checkpoint_interval(2);
    let old = finished_run(&db, 400).await;
    let config = ClientConfig::default();
    assert_eq!(config.run_retention, None);
    assert_eq!(retention_pass(&db, &config).await, 0);
    assert_eq!(stored(&db, old).await, (8, 1, 1, 3));
    // The step is part of the leader's maintenance.
    assert!(
        pgcrew::client::default_maintenance_steps()
            .iter()
            .any(|s| s.name() == "run_retention")
    );
}

#[tokio::test]
async fn run_retention_purges_old_finished_runs_in_batches_keeping_anchors_and_costs() {
    let t = test_db().await;
    let key = LedgerKey::new(KEY).unwrap();
    let db =
        t.db.clone()
            .with_ledger_key(key.clone())
            .with_checkpoint_interval(2);
    let mut old = Vec::new();
    for _ in 0..5 {
        old.push(finished_run(&db, 10).await);
    }
    // Untouched: a recent finished run, a running run, a pending run, costs without a run.
    let recent = finished_run(&db, 0).await;
    let (running, lease) = started_run(&db).await;
    runs::put_artifact(&db, running, "a", json!(1), Some(lease.token))
        .await
        .unwrap();
    add_costs(&db, Some(running)).await;
    let pending = new_run(&db).await;
    add_costs(&db, None).await;
    let conn = db.get().await.unwrap();
    // Make the running/pending runs old too: only finished runs are retained.
    conn.execute(
        "UPDATE pgcrew.runs SET created_at = now() - interval '30 days' WHERE id = ANY($1)",
        &[&vec![running, pending]],
    )
    .await
    .unwrap();
    let spent_before = default_spent(&conn).await;
    let costs_before = tenant_costs(&db).await;
    let heads: Vec<i64> = {
        let mut v = Vec::new();
        for r in &old {
            v.push(runs::verify_run_chain(&db, *r).await.unwrap().head_seq);
        }
        v
    };
    let untouched = [
        (recent, stored(&db, recent).await),
        (running, stored(&db, running).await),
        (pending, stored(&db, pending).await),
    ];

    let config = ClientConfig::builder()
        .run_retention(Duration::from_secs(86_400))
        .run_retention_batch_size(2)
        .build()
        .unwrap();
    // Bounded batches: 2 + 2 + 1, then nothing left.
    let mut passes = Vec::new();
    loop {
        let n = retention_pass(&db, &config).await;
        passes.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(passes, vec![2, 2, 1, 0]);

    for (r, head) in old.iter().zip(&heads) {
        assert_eq!(stored(&db, *r).await, (0, 0, 0, 0), "run {r} retained");
        // The anchor is kept and verifies, without and with the key.
        let v = runs::verify_run_chain(&db, *r).await.unwrap();
        assert!(v.valid, "{v:?}");
        let anchor = v.anchor.expect("chain anchor kept");
        assert_eq!(anchor.last_seq, *head);
        assert_eq!(anchor.reason, "retention");
        assert!(runs::verify_run_chain_sql(&db, *r).await.unwrap().valid);
        let signed = runs::verify_run_chain_signed(&db, *r, &key).await.unwrap();
        assert!(signed.valid, "{signed:?}");
        assert_eq!(signed.signed_seq, Some(*head));
        // Only the final checkpoint stays.
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM pgcrew.ledger_checkpoints WHERE run_id = $1",
                *r
            )
            .await,
            1
        );
        // The run row stays (closed), its prompt and response are gone.
        let run = runs::get_run(&db, *r).await.unwrap();
        assert!(run.state.is_terminal());
        assert!(matches!(
            runs::append_event(&db, *r, NewEvent::new("x", json!(1)), None).await,
            Err(Error::LedgerClosed { .. })
        ));
    }
    for (r, before) in untouched {
        assert_eq!(stored(&db, r).await, before, "run {r} untouched");
        assert!(
            runs::verify_run_chain(&db, r)
                .await
                .unwrap()
                .anchor
                .is_none()
        );
    }
    // The cost figures are identical; the aggregate holds the retained entries.
    assert_eq!(tenant_costs(&db).await, costs_before);
    let spent_after = default_spent(&conn).await;
    assert_eq!(spent_after, spent_before);
    let folded = scalar_on(&conn, "SELECT sum(entries)::int8 FROM pgcrew.cost_daily").await;
    assert_eq!(folded, 15);
    let breakdown = pgcrew::tenancy::cost_breakdown(&db, &pgcrew::tenancy::CostFilter::default())
        .await
        .unwrap();
    assert_eq!(breakdown.iter().map(|r| r.entries).sum::<i64>(), 15 + 6 + 3);
}

// ---------------------------------------------------------------------------------------------
// 4. Run row rules without CHECK constraints (V015)
// ---------------------------------------------------------------------------------------------

/// PostgreSQL prepares every CHECK constraint of a table in each statement that writes it, so
/// `pgcrew.runs` carries none (each ledger append updates the run's head): its rules live in the
/// `runs_check_row` trigger, which refuses the same values with the same SQLSTATE and constraint
/// names, on UPDATE and INSERT, and still refuses illegal transitions.
#[tokio::test]
async fn sql_run_row_rules_hold_without_check_constraints() {
    let t = test_db().await;
    let run = new_run(&t.db).await;
    let conn = t.db.get().await.unwrap();
    let checks = scalar_on(&conn, "SELECT count(*) FROM pg_constraint WHERE conrelid = 'pgcrew.runs'::regclass AND contype = 'c'").await;
    assert_eq!(
        checks, 0,
        "CHECK constraints on pgcrew.runs cost every ledger append"
    );

    let bad = [
        ("state = 'bogus'", "runs_state_check"),
        ("ledger_format = 3", "runs_ledger_format_check"),
        ("cost_usd = 'NaN'", "runs_cost_usd_valid"),
        ("cost_usd = -1", "runs_cost_usd_valid"),
        ("budget_usd_limit = -1", "runs_budget_usd_limit_valid"),
        ("budget_spent_usd = 'NaN'", "runs_budget_spent_usd_valid"),
        (
            "budget_reserved_usd = -0.5",
            "runs_budget_reserved_usd_valid",
        ),
        ("input_tokens = -1", "runs_input_tokens_valid"),
        ("output_tokens = -1", "runs_output_tokens_valid"),
    ];
    for (set, constraint) in bad {
        let e = conn
            .execute(
                &format!("UPDATE pgcrew.runs SET {set} WHERE id = $1"),
                &[&run],
            )
            .await
            .expect_err(set);
        assert_eq!(sqlstate(&e), "23514", "{set}: {e}");
        let db = e.as_db_error().unwrap();
        assert_eq!(db.constraint(), Some(constraint), "{set}");
        assert!(db.message().contains(constraint), "{set}: {}", db.message());
    }
    // Inserts are checked too.
    for (insert, what, constraint) in [
        (
            "INSERT INTO pgcrew.runs (id, tenant_id, cost_usd) VALUES (gen_random_uuid(), 'default', 'NaN')",
            "NaN insert",
            "runs_cost_usd_valid",
        ),
        (
            "INSERT INTO pgcrew.runs (id, tenant_id, state) VALUES (gen_random_uuid(), 'default', 'bogus')",
            "bogus state insert",
            "runs_state_check",
        ),
    ] {
        let e = conn.execute(insert, &[]).await.expect_err(what);
        assert_eq!(e.as_db_error().unwrap().constraint(), Some(constraint));
    }

    // Nothing was stored, and good writes and the state machine still work.
    let row = conn
        .query_one(
            "SELECT state, cost_usd::text, input_tokens FROM pgcrew.runs WHERE id = $1",
            &[&run],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, String>(1), "0.0000000000");
    assert_eq!(row.get::<_, i64>(2), 0);
    conn.execute(
        "UPDATE pgcrew.runs SET cost_usd = 0.5, input_tokens = 3, state = 'cancelled' WHERE id = $1",
        &[&run],
    )
    .await
    .unwrap();
    let e = conn
        .execute(
            "UPDATE pgcrew.runs SET state = 'running' WHERE id = $1",
            &[&run],
        )
        .await
        .expect_err("cancelled -> running");
    assert_eq!(sqlstate(&e), "23514");
    assert_eq!(
        e.as_db_error().unwrap().hint(),
        Some("pgcrew_illegal_transition")
    );
}

// ---------------------------------------------------------------------------------------------
// Run row retention (issue #22, V036): the rows and anchors of long-retained runs go.
// ---------------------------------------------------------------------------------------------

async fn row_retention_pass(db: &Db, config: &ClientConfig) -> u64 {
    let mut conn = db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let n = runs::RunRowRetention
        .run(&tx, &ctx(config.clone()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    n
}

/// A run whose parent is `parent`, started under a 60 s lease: the run and its lease.
async fn started_child(db: &Db, parent: RunId) -> (RunId, runs::RunLease) {
    let mut new = NewRun::new(tenant()).agent("edges");
    new.parent_run_id = Some(parent);
    let run = runs::create_run(db, new).await.unwrap();
    let lease = runs::acquire_run_lease(db, run, "w", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    runs::start_run(
        db,
        run,
        None,
        Some(lease.token),
        runs::LimitPolicy::StayPending,
    )
    .await
    .unwrap();
    (run, lease)
}

/// Complete `run` (one event first) and date its end `age_days` ago.
async fn finish_aged(db: &Db, run: RunId, lease: &runs::RunLease, age_days: i32) {
    runs::append_event(db, run, NewEvent::new("note", json!(1)), Some(lease.token))
        .await
        .unwrap();
    runs::complete_run(db, run, RunOutcome::default(), Some(lease.token))
        .await
        .unwrap();
    execute(
        db,
        "UPDATE pgcrew.runs SET finalized_at = now() - make_interval(days => $2) WHERE id = $1",
        &[&run, &age_days],
    )
    .await;
}

/// What is left of a run: its row, chain anchor, checkpoints.
async fn left_of(db: &Db, run: RunId) -> (i64, i64, i64) {
    let row = db
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT (SELECT count(*) FROM pgcrew.runs WHERE id = $1),
                    (SELECT count(*) FROM pgcrew.chain_anchors WHERE run_id = $1),
                    (SELECT count(*) FROM pgcrew.ledger_checkpoints WHERE run_id = $1)",
            &[&run],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn run_row_retention_is_off_by_default() {
    let t = test_db().await;
    let db = t.db.clone().with_ledger_key(LedgerKey::new(KEY).unwrap());
    let old = finished_run(&db, 400).await;
    let config = ClientConfig::builder()
        .run_retention(Duration::from_secs(86_400))
        .build()
        .unwrap();
    assert_eq!(config.run_row_retention, None);
    assert_eq!(retention_pass(&db, &config).await, 1);
    assert_eq!(row_retention_pass(&db, &config).await, 0);
    assert_eq!(left_of(&db, old).await.0, 1);
    assert!(
        pgcrew::client::default_maintenance_steps()
            .iter()
            .any(|s| s.name() == "run_row_retention")
    );
}

#[tokio::test]
async fn run_row_retention_deletes_old_retained_runs_children_first_keeping_costs() {
    let t = test_db().await;
    let db = t.db.clone().with_ledger_key(LedgerKey::new(KEY).unwrap());
    // Three old finished runs (with costs and a reservation naming one of them).
    let mut old = Vec::new();
    for _ in 0..3 {
        old.push(finished_run(&db, 10).await);
    }
    execute(
        &db,
        "INSERT INTO pgcrew.budget_reservations (id, tenant_id, run_id, amount_usd)
         VALUES (gen_random_uuid(), 'default', $1, 0.5)",
        &[&old[0]],
    )
    .await;
    // Retained but not old enough for row retention.
    let recent = finished_run(&db, 3).await;
    // An old finished parent with a running child; an old finished child of a running parent.
    let (parent, plain) = started_run(&db).await;
    finish_aged(&db, parent, &plain, 10).await;
    let (child, child_lease) = started_child(&db, parent).await;
    let (running_parent, _l) = started_run(&db).await;
    let (orphan_child, ol) = started_child(&db, running_parent).await;
    finish_aged(&db, orphan_child, &ol, 10).await;
    // Never retained (run retention off for it: it is a day old only) and not finished.
    let pending = new_run(&db).await;

    let config = ClientConfig::builder()
        .run_retention(Duration::from_secs(2 * 86_400))
        .run_row_retention(Duration::from_secs(5 * 86_400))
        .run_retention_batch_size(2)
        .build()
        .unwrap();
    let costs_before = tenant_costs(&db).await;
    while retention_pass(&db, &config).await > 0 {}
    // Bounded batches: 2 + 1 (the parent has a child, the orphan's parent is running).
    let mut passes = Vec::new();
    loop {
        let n = row_retention_pass(&db, &config).await;
        passes.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(passes, vec![2, 1, 0]);
    for r in &old {
        assert_eq!(left_of(&db, *r).await, (0, 0, 0), "run {r} deleted");
        assert!(runs::get_run(&db, *r).await.is_err());
    }
    // The reservation stays, unlinked; the cost figures are unchanged.
    assert_eq!(
        scalar_on(
            &db.get().await.unwrap(),
            "SELECT count(*) FROM pgcrew.budget_reservations WHERE run_id IS NULL"
        )
        .await,
        1
    );
    assert_eq!(tenant_costs(&db).await, costs_before);
    for r in [recent, parent, orphan_child] {
        assert_eq!(left_of(&db, r).await.0, 1, "run {r} kept");
        assert!(runs::verify_run_chain(&db, r).await.unwrap().valid);
    }
    for r in [child, running_parent, pending] {
        assert_eq!(left_of(&db, r).await.0, 1, "run {r} kept");
    }

    // The child finishes and ages: it goes first, then its parent.
    finish_aged(&db, child, &child_lease, 10).await;
    while retention_pass(&db, &config).await > 0 {}
    assert_eq!(row_retention_pass(&db, &config).await, 1);
    assert_eq!(left_of(&db, child).await, (0, 0, 0));
    assert_eq!(left_of(&db, parent).await.0, 1);
    assert_eq!(row_retention_pass(&db, &config).await, 1);
    assert_eq!(left_of(&db, parent).await, (0, 0, 0));
    assert_eq!(row_retention_pass(&db, &config).await, 0);
    assert_eq!(left_of(&db, orphan_child).await.0, 1);
}

#[tokio::test]
async fn run_row_retention_skips_a_run_still_holding_events_and_refuses_bad_input() {
    let t = test_db().await;
    let db = t.db.clone();
    let old = finished_run(&db, 10).await;
    // Marked retained by hand while its events are still there (as retention leaves a ledger
    // that does not end at its recorded head): kept.
    execute(
        &db,
        "UPDATE pgcrew.runs SET retained_at = now() WHERE id = $1",
        &[&old],
    )
    .await;
    let config = ClientConfig::builder()
        .run_row_retention(Duration::from_secs(86_400))
        .build()
        .unwrap();
    assert_eq!(row_retention_pass(&db, &config).await, 0);
    assert_eq!(left_of(&db, old).await.0, 1);
    let conn = db.get().await.unwrap();
    for (age, batch) in [(-1i64, 1i32), (0, 0)] {
        let e = conn
            .query(
                "SELECT * FROM pgcrew.delete_retained_runs($1, $2)",
                &[&age, &batch],
            )
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22023");
    }
}
