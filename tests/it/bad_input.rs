//! Bad-input sweep: malformed DSNs, wrong credentials, a newer schema, oversized payloads,
//! invalid JSON, tool arguments that violate the schema, unknown ids, illegal transitions,
//! negative/NaN budgets, SQL metacharacters and unicode in ids and names. Each gets a clear
//! error AND leaves the database unchanged (a checksum of every pgcrew table), through the
//! library API and through the CLI (exit code 2 and an `error:` line).

use std::time::Duration;

use pgcrew::queue::{self, MAX_PAYLOAD_BYTES, NewTask};
use pgcrew::runs::{self, NewRun, RunOutcome};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Db, Error, RunId, SessionId, TaskId, TenantId, Tool};
use serde_json::json;

use crate::common::{TestDb, connect_error, dsn_parts, first_column, pgcrew_bin, test_db};

/// Row count and content hash of every table in schema `pgcrew`.
async fn checksum(db: &Db) -> Vec<(String, i64, String)> {
    let conn = db.get().await.unwrap();
    let tables: Vec<String> = first_column(
        &conn,
        "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'pgcrew' AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .await;
    assert!(tables.len() >= 10, "pgcrew tables: {tables:?}");
    let mut out = Vec::new();
    for t in tables {
        let row = conn
            .query_one(
                &format!(
                    "SELECT count(*), md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) \
                     FROM pgcrew.\"{t}\" x"
                ),
                &[],
            )
            .await
            .unwrap();
        out.push((t, row.get(0), row.get(1)));
    }
    out
}

/// Run the CLI against `dsn`; returns (exit code, stdout, stderr).
fn cli(dsn: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(pgcrew_bin())
        .args(args)
        .env("DATABASE_URL", dsn)
        .env_remove("PGCREW_TEST_DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The CLI refuses: exit code 2, an `error:` line containing `needle`, and nothing stored.
async fn cli_refuses(t: &TestDb, args: &[&str], needle: &str) {
    let before = checksum(&t.db).await;
    let (code, _out, err) = cli(t.dsn(), args);
    assert_eq!(code, 2, "{args:?}: exit {code}, stderr: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{args:?}: no `error:` line in {err:?}"));
    assert!(
        line.to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: {line:?} does not mention {needle:?}"
    );
    assert_eq!(
        before,
        checksum(&t.db).await,
        "{args:?} changed the database"
    );
}

const NASTY: &[&str] = &[
    "'; DROP TABLE pgcrew.tasks; --",
    "\" OR 1=1 --",
    "a\\b%_*",
    "$1::text",
    "租户-ü-🚀",
    "e\u{301}",
    " leading and trailing ",
];

#[tokio::test]
async fn malformed_dsn_unknown_database_and_wrong_credentials_get_clear_errors() {
    let t = test_db().await;
    let before = checksum(&t.db).await;
    for dsn in [
        "this is not a dsn",
        "postgresql://127.0.0.1:notaport/db",
        "postgres://user@/db?sslmode=bogus",
        "host=127.0.0.1 port=1 dbname=x connect_timeout=1",
    ] {
        let e = Db::connect(dsn, 1, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Connect { .. } | Error::Config(_)),
            "{dsn}: {e:?}"
        );
        assert!(!e.to_string().is_empty());
    }
    let (host, port, user, password) = dsn_parts(t.dsn());
    // A role that does not exist: an authentication error naming the problem.
    let e = connect_error(
        &format!("host={host} port={port} user=no_such_role_x password=wrong dbname=postgres"),
        1,
    )
    .await;
    assert!(matches!(e, Error::Authentication { .. }), "{e:?}");
    assert!(e.to_string().contains("no_such_role_x"), "{e}");
    // A database that does not exist: a connect error that says what to do.
    let password = password
        .map(|p| format!(" password='{p}'"))
        .unwrap_or_default();
    let e = connect_error(
        &format!("host={host} port={port} user={user}{password} dbname=no_such_db_x"),
        1,
    )
    .await;
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains("no_such_db_x"), "{e}");
    assert_eq!(before, checksum(&t.db).await);

    // The CLI: exit 2 and an `error:` line.
    for dsn in [
        "this is not a dsn",
        "host=127.0.0.1 port=1 dbname=x connect_timeout=1",
    ] {
        let (code, _, err) = cli(dsn, &["tasks", "stats"]);
        assert_eq!(code, 2, "{err}");
        assert!(err.lines().any(|l| l.starts_with("error:")), "{err}");
    }
    let (code, _, err) = cli(
        &format!("host={host} port={port} user=no_such_role_x password=wrong dbname=postgres"),
        &["tasks", "stats"],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("error:") && err.contains("no_such_role_x"),
        "{err}"
    );
}

#[tokio::test]
async fn a_database_of_a_newer_schema_version_is_refused_and_left_alone() {
    let t = test_db().await;
    let latest = t.db.check_schema().await.unwrap();
    {
        let conn = t.db.get().await.unwrap();
        conn.execute(
            "INSERT INTO pgcrew.refinery_schema_history (version, name, applied_on, checksum) \
             VALUES ($1, 'from_the_future', now()::text, '0')",
            &[&((latest + 1) as i32)],
        )
        .await
        .unwrap();
    }
    let before = checksum(&t.db).await;
    let e = t.db.check_schema().await.unwrap_err();
    assert!(matches!(e, Error::SchemaTooNew { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&(latest + 1).to_string()), "{msg}");
    let e = t.db.migrate().await.unwrap_err();
    assert!(matches!(e, Error::SchemaTooNew { .. }), "{e:?}");
    let e = match pgcrew::Client::builder(t.db.clone()).build().await {
        Ok(c) => match c.start().await {
            Ok(()) => {
                c.stop().await.unwrap();
                panic!("a client started against a newer schema");
            }
            Err(e) => e,
        },
        Err(e) => e,
    };
    assert!(matches!(e, Error::SchemaTooNew { .. }), "{e:?}");
    assert_eq!(before, checksum(&t.db).await);
    cli_refuses(&t, &["migrate"], "upgrade pgcrew").await;
}

#[tokio::test]
async fn task_inputs_oversized_invalid_or_unknown_are_refused_and_store_nothing() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    let before = checksum(&t.db).await;
    // Payload over the limit.
    let big = NewTask::new("k", &"x".repeat(MAX_PAYLOAD_BYTES + 1)).unwrap();
    let e = queue::enqueue(&conn, &big).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e:?}");
    assert!(e.to_string().contains("bytes"), "{e}");
    // A batch with one bad task stores none of them.
    let batch = vec![NewTask::new("k", &json!({})).unwrap(), big.clone()];
    assert!(queue::enqueue_many(&conn, &batch).await.is_err());
    // Unknown tenant, unknown dependency, empty kind, bad attempts.
    let e = queue::enqueue(
        &conn,
        &NewTask::new("k", &json!({}))
            .unwrap()
            .tenant(TenantId::new("no-such-tenant").unwrap()),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("no-such-tenant"), "{e}");
    let e = queue::enqueue(
        &conn,
        &NewTask::new("k", &json!({}))
            .unwrap()
            .depends_on([TaskId(987_654_321)]),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("987654321"), "{e}");
    assert!(
        queue::enqueue(&conn, &NewTask::new("", &json!({})).unwrap())
            .await
            .is_err()
    );
    assert!(
        queue::enqueue(
            &conn,
            &NewTask::new("k", &json!({})).unwrap().max_attempts(0)
        )
        .await
        .is_err()
    );
    // Unknown task ids.
    let e = queue::get(&conn, TaskId(987_654_321)).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert_eq!(before, checksum(&t.db).await);

    // Through the CLI.
    cli_refuses(
        &t,
        &["tasks", "enqueue", "--kind", "k", "--payload", "{not json"],
        "json",
    )
    .await;
    // (An over-limit payload cannot be passed as one argv string: Linux caps a single argument
    // at 128 KiB, below MAX_PAYLOAD_BYTES; the library check above covers it.)
    cli_refuses(
        &t,
        &[
            "tasks",
            "enqueue",
            "--kind",
            "k",
            "--tenant",
            "no-such-tenant",
        ],
        "no-such-tenant",
    )
    .await;
    cli_refuses(&t, &["tasks", "cancel", "987654321"], "987654321").await;
    cli_refuses(&t, &["tasks", "cancel", "'; DROP TABLE x"], "").await;
    cli_refuses(
        &t,
        &["tasks", "enqueue", "--kind", "k", "--delay", "-5s"],
        "",
    )
    .await;
}

#[tokio::test]
async fn budgets_that_are_negative_nan_or_infinite_are_refused() {
    let t = test_db().await;
    let before = checksum(&t.db).await;
    for bad in [-1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let ctx = TenantContext::new("acme").unwrap().budget_usd(Some(bad));
        let e = tenancy::upsert(&t.db, &ctx).await.unwrap_err();
        assert!(matches!(e, Error::InvalidInput { .. }), "{bad}: {e:?}");
    }
    let e = tenancy::upsert(
        &t.db,
        &TenantContext::new("acme").unwrap().limits(Some(-3), None),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e:?}");
    assert_eq!(before, checksum(&t.db).await);
    for bad in ["-5", "NaN", "inf", "abc"] {
        let (code, _, err) = cli(t.dsn(), &["tenants", "set", "acme", "--budget-usd", bad]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("error:"), "{bad}: {err}");
    }
    assert_eq!(before, checksum(&t.db).await);

    // Reservations: a NaN or negative estimate is refused before anything is reserved.
    tenancy::upsert(
        &t.db,
        &TenantContext::new("acme").unwrap().budget_usd(Some(10.0)),
    )
    .await
    .unwrap();
    let before = checksum(&t.db).await;
    for bad in [-1.0, f64::NAN] {
        let req = tenancy::budget::ReserveRequest::new(TenantId::new("acme").unwrap(), bad);
        let e = tenancy::budget::reserve(&t.db, &req).await.unwrap_err();
        assert!(matches!(e, Error::InvalidInput { .. }), "{bad}: {e:?}");
    }
    assert_eq!(before, checksum(&t.db).await);
}

#[tokio::test]
async fn unknown_ids_and_illegal_transitions_are_refused_and_change_nothing() {
    let t = test_db().await;
    let tenant = TenantId::new("default").unwrap();
    let run = runs::create_run(&t.db, NewRun::new(tenant.clone()))
        .await
        .unwrap();
    let submitter = pgcrew::AgentRuntime::new(
        pgcrew::Kernel::new(
            t.db.clone(),
            std::sync::Arc::new(pgcrew::ScriptedModel::demo_agent()),
        ),
        "bad-input",
    );
    let session = submitter.new_session(&tenant, "user").await.unwrap();
    let before = checksum(&t.db).await;
    // An unknown agent: refused, no run and no task stored.
    let e = submitter
        .submit("no-such-agent", session.id, "hello")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no-such-agent"), "{e:?}");
    assert!(
        submitter
            .submit("no-such-agent", SessionId::new(), "hello")
            .await
            .is_err()
    );
    assert_eq!(before, checksum(&t.db).await);
    let ghost = RunId::new();
    for e in [
        runs::get_run(&t.db, ghost).await.unwrap_err(),
        runs::cancel_run(&t.db, ghost, "why not").await.unwrap_err(),
        runs::verify_run_chain(&t.db, ghost).await.unwrap_err(),
        tenancy::get(&t.db, &TenantId::new("nobody").unwrap())
            .await
            .unwrap_err(),
        pgcrew::agent::get_agent(&t.db, "no-such-agent")
            .await
            .unwrap_err(),
        runs::get_session(&t.db, SessionId::new())
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    }
    // A run for an unknown tenant, a session for an unknown tenant.
    assert!(
        runs::create_run(&t.db, NewRun::new(TenantId::new("nobody").unwrap()))
            .await
            .is_err()
    );
    assert!(
        runs::new_session(&t.db, &TenantId::new("nobody").unwrap(), "x", json!({}))
            .await
            .is_err()
    );
    // Illegal transitions: completing a pending run.
    let e = runs::complete_run(&t.db, run, RunOutcome::default(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::IllegalTransition { .. }), "{e:?}");
    // Negative tokens / NaN cost.
    let e = runs::complete_run(
        &t.db,
        run,
        RunOutcome {
            cost_usd: f64::NAN,
            ..RunOutcome::default()
        },
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e:?}");
    assert_eq!(before, checksum(&t.db).await);
    // Cancel it, then nothing leaves the terminal state.
    runs::cancel_run(&t.db, run, "test").await.unwrap();
    let before = checksum(&t.db).await;
    let e = runs::start_run(&t.db, run, None, None, runs::LimitPolicy::Reject)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::IllegalTransition { .. }), "{e:?}");
    assert!(runs::cancel_run(&t.db, run, "again").await.is_err());
    assert!(
        runs::fail_run(&t.db, run, "x", "boom", None).await.is_err(),
        "failed a cancelled run"
    );
    assert_eq!(before, checksum(&t.db).await);

    // The CLI.
    let ghost_s = ghost.to_string();
    cli_refuses(&t, &["run", "status", &ghost_s], &ghost_s).await;
    cli_refuses(&t, &["run", "cancel", &ghost_s], &ghost_s).await;
    cli_refuses(&t, &["run", "status", "not-a-uuid"], "").await;
    cli_refuses(
        &t,
        &["run", "verify-ledger", "'; DROP TABLE pgcrew.runs; --"],
        "",
    )
    .await;
    cli_refuses(&t, &["run", "cancel", &run.to_string()], "").await;
    cli_refuses(&t, &["tenants", "show", "nobody"], "nobody").await;
}

#[tokio::test]
async fn tool_arguments_that_violate_the_schema_are_refused_with_the_reason() {
    let tool = Tool::builder("lookup_order")
        .input_schema(json!({
            "type": "object",
            "properties": {
                "order_id": {"type": "string", "minLength": 3},
                "qty": {"type": "integer", "minimum": 1}
            },
            "required": ["order_id"],
            "additionalProperties": false
        }))
        .handler(|_ctx, _args| async move { Ok(json!({})) })
        .build()
        .unwrap();
    assert!(tool.validate_arguments(&json!({"order_id": "A-1"})).is_ok());
    for (bad, mentions) in [
        (json!({}), "order_id"),
        (json!({"order_id": 7}), "order_id"),
        (json!({"order_id": "A-1", "qty": 0}), "qty"),
        (json!({"order_id": "A-1", "qty": 1.5}), "qty"),
        (json!({"order_id": "A-1", "extra": true}), "extra"),
        (json!("not an object"), ""),
        (json!(null), ""),
    ] {
        let e = tool.validate_arguments(&bad).unwrap_err();
        assert!(matches!(e, Error::InvalidInput { .. }), "{bad}: {e:?}");
        assert!(e.to_string().contains(mentions), "{bad}: {e}");
    }
    // Tool names with metacharacters or non-object schemas are refused at definition time.
    for name in NASTY {
        assert!(
            pgcrew::agent::tool::validate_tool_name(name).is_err(),
            "{name:?}"
        );
    }
    assert!(
        Tool::builder("t")
            .input_schema(json!({"type": "string"}))
            .handler(|_ctx, _args| async move { Ok(json!({})) })
            .build()
            .is_err()
    );
}

#[tokio::test]
async fn sql_metacharacters_and_unicode_in_ids_and_names_are_stored_verbatim_or_refused() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    for s in NASTY {
        // Tenants: either refused clearly, or stored and read back verbatim.
        match TenantId::new(*s) {
            Ok(id) => {
                assert_eq!(id.as_str(), *s);
                tenancy::upsert(&t.db, &TenantContext::for_id(id.clone()))
                    .await
                    .unwrap();
                assert_eq!(
                    tenancy::get(&t.db, &id).await.unwrap().context.tenant_id,
                    id
                );
                // A task in a queue and kind of that name, on that tenant.
                let e = queue::enqueue(
                    &conn,
                    &NewTask::new(*s, &json!({ "name": s }))
                        .unwrap()
                        .queue(*s)
                        .tenant(id.clone()),
                )
                .await;
                match e {
                    Ok(e) => {
                        let row = queue::get(&conn, e.id).await.unwrap();
                        assert_eq!(row.queue, *s);
                        assert_eq!(row.kind, *s);
                        assert_eq!(row.tenant_id, id.as_str());
                    }
                    Err(e) => assert!(matches!(e, Error::InvalidInput { .. }), "{e:?}"),
                }
                let session = runs::new_session(&t.db, &id, s, json!({ "k": s }))
                    .await
                    .unwrap();
                assert_eq!(session.identifier, *s);
            }
            Err(e) => assert!(matches!(e, Error::InvalidInput { .. }), "{s:?}: {e:?}"),
        }
    }
    // The schema is intact.
    assert!(
        conn.query_one("SELECT count(*) FROM pgcrew.tasks", &[])
            .await
            .is_ok()
    );
    // Ids that are not ids.
    for s in ["", "\u{0}", "a\nb", &"x".repeat(129)] {
        assert!(TenantId::new(s).is_err(), "{s:?}");
    }
    for s in [
        "",
        "not-a-uuid",
        "'; --",
        "00000000-0000-0000-0000-00000000000g",
    ] {
        let e = s.parse::<RunId>().unwrap_err();
        assert!(matches!(e, Error::InvalidInput { .. }), "{s:?}: {e:?}");
    }
    for s in ["", "-", "1.5", "abc", "99999999999999999999999", "1; DROP"] {
        assert!(s.parse::<TaskId>().is_err(), "{s:?}");
    }
    // Through the CLI: a tenant name with metacharacters.
    let (code, _, err) = cli(
        t.dsn(),
        &["tenants", "set", "x'; DROP TABLE pgcrew.tenants; --"],
    );
    assert!(code == 0 || code == 2, "{err}");
    assert!(
        conn.query_one("SELECT count(*) FROM pgcrew.tenants", &[])
            .await
            .is_ok()
    );
}

/// Benchmarks refuse sizes they cannot run before creating anything.
#[tokio::test]
async fn bench_sizes_out_of_range_are_refused_before_anything_is_created() {
    let t = test_db().await;
    cli_refuses(&t, &["bench", "queue", "--tasks", "0"], "--tasks").await;
    cli_refuses(&t, &["bench", "scale", "--batch", "0"], "--batch").await;
    cli_refuses(&t, &["bench", "scale", "--batch", "1001"], "--batch").await;
    cli_refuses(&t, &["bench", "scale", "--samples", "0"], "--samples").await;
    for flag in [
        "--subscribers",
        "--notifications",
        "--raw-samples",
        "--rounds",
    ] {
        cli_refuses(&t, &["bench", "fanout", flag, "0"], flag).await;
    }
}
