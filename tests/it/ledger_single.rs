//! Issue #14, benchmark line (V023): one event goes through `pgcrew.append_event`, the per-event
//! path of `pgcrew.append_events` with scalar arguments. Both functions answer every input the
//! same way: the same SQLSTATE and message for each refusal, the same idempotent lookup, and one
//! chain that verifies whichever function wrote each event, in both ledger formats.

use pgcrew::RunId;
use pgcrew::db::Db;
use pgcrew::runs::{self, RunOutcome};
use serde_json::{Value, json};

use crate::common::{running_run, test_db, v1_run};

/// The recorded head seq of a run.
async fn head_of(db: &Db, run: RunId) -> i64 {
    crate::common::scalar(
        db,
        &format!("SELECT ledger_head_seq FROM pgcrew.runs WHERE id = '{run}'"),
    )
    .await
}

/// An event's (type, step key, payload, idempotent).
type Event<'a> = (&'a str, Option<&'a str>, &'a Value, bool);

/// Which SQL function appends.
#[derive(Debug, Clone, Copy)]
enum Via {
    Scalar,
    Arrays,
}

/// One event appended by `via`: (seq, inserted), or the SQLSTATE and message of its error.
async fn append(
    db: &Db,
    via: Via,
    run: uuid::Uuid,
    token: Option<i64>,
    (ty, key, payload, dedupe): Event<'_>,
) -> Result<(i64, bool), (String, String)> {
    let conn = db.get().await.unwrap();
    let result = match via {
        Via::Scalar => {
            conn.query_one(
                "SELECT o_seq, o_inserted FROM pgcrew.append_event($1, $2, $3, $4, $5, $6)",
                &[&run, &token, &ty, &key, payload, &dedupe],
            )
            .await
        }
        Via::Arrays => {
            conn.query_one(
                "SELECT o_seq, o_inserted FROM pgcrew.append_events($1, $2, ARRAY[$3::text], \
                 ARRAY[$4::text], ARRAY[$5::jsonb], ARRAY[$6::bool])",
                &[&run, &token, &ty, &key, payload, &dedupe],
            )
            .await
        }
    };
    result.map(|r| (r.get(0), r.get(1))).map_err(|e| {
        let d = e.as_db_error().expect("a database error");
        (d.code().code().to_string(), d.message().to_string())
    })
}

/// Both functions, the same input: the same answer (compared by the caller's closure).
async fn both(
    db: &Db,
    run: uuid::Uuid,
    token: Option<i64>,
    event: Event<'_>,
) -> [Result<(i64, bool), (String, String)>; 2] {
    [
        append(db, Via::Scalar, run, token, event).await,
        append(db, Via::Arrays, run, token, event).await,
    ]
}

#[tokio::test]
async fn the_scalar_append_refuses_what_append_events_refuses_with_the_same_error() {
    let t = test_db().await;
    let run = running_run(&t.db, 2).await;
    let small = json!({"ok": true});
    let big = json!({"blob": "x".repeat(1_048_576)});
    let long_type = "t".repeat(129);
    let long_key = "k".repeat(513);
    let cases: Vec<(&str, uuid::Uuid, Option<i64>, Event, &str)> = vec![
        (
            "unknown run",
            uuid::Uuid::new_v4(),
            None,
            ("note", None, &small, false),
            "PC002",
        ),
        (
            "empty type",
            run.as_uuid(),
            None,
            ("", None, &small, false),
            "PC040",
        ),
        (
            "long type",
            run.as_uuid(),
            None,
            (&long_type, None, &small, false),
            "PC040",
        ),
        (
            "long step key",
            run.as_uuid(),
            None,
            ("note", Some(&long_key), &small, false),
            "PC040",
        ),
        (
            "long idempotent step key",
            run.as_uuid(),
            None,
            ("note", Some(&long_key), &small, true),
            "PC040",
        ),
        (
            "payload over 1 MiB",
            run.as_uuid(),
            None,
            ("note", None, &big, false),
            "PC040",
        ),
        (
            "lease not held",
            run.as_uuid(),
            Some(7),
            ("note", None, &small, false),
            "PC001",
        ),
    ];
    let head = head_of(&t.db, run).await;
    for (case, target, token, event, code) in cases {
        let [scalar, arrays] = both(&t.db, target, token, event).await;
        let scalar = scalar.expect_err(case);
        assert_eq!(Err(scalar.clone()), arrays, "{case}");
        assert_eq!(scalar.0, code, "{case}: {}", scalar.1);
        assert_eq!(head_of(&t.db, run).await, head, "{case}");
    }

    // An event written by plain SQL at the next seq: PC004 from both, naming it and the head.
    t.db.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, payload, prev_hash, hash, created_at) \
             VALUES ($1, $2, 'default', 'stray', '{}', '\\x00', '\\x01', now())",
            &[&run, &(head + 1)],
        )
        .await
        .unwrap();
    let [scalar, arrays] = both(&t.db, run.as_uuid(), None, ("note", None, &small, false)).await;
    let scalar = scalar.expect_err("beyond the head");
    assert_eq!(Err(scalar.clone()), arrays);
    assert_eq!(scalar.0, "PC004");
    assert!(
        scalar.1.contains(&format!(
            "already has an event at seq {}, beyond its recorded head (seq {head})",
            head + 1
        )),
        "{}",
        scalar.1
    );

    // A finished run's ledger is closed to both.
    let done = running_run(&t.db, 1).await;
    runs::complete_run(&t.db, done, RunOutcome::default(), None)
        .await
        .unwrap();
    let [scalar, arrays] = both(&t.db, done.as_uuid(), None, ("note", None, &small, false)).await;
    let scalar = scalar.expect_err("closed ledger");
    assert_eq!(Err(scalar.clone()), arrays);
    assert_eq!(scalar.0, "PC003", "{}", scalar.1);
}

#[tokio::test]
async fn scalar_and_array_appends_make_one_chain_in_both_formats() {
    let t = test_db().await;
    for run in [running_run(&t.db, 0).await, v1_run(&t.db).await] {
        let id = run.as_uuid();
        let start = head_of(&t.db, run).await;
        let mut seqs = Vec::new();
        for i in 0..6 {
            let via = if i % 2 == 0 { Via::Scalar } else { Via::Arrays };
            let payload = json!({"i": i});
            let step = format!("s{i}");
            let (seq, inserted) =
                append(&t.db, via, id, None, ("note", Some(&step), &payload, false))
                    .await
                    .unwrap();
            assert!(inserted, "{via:?} {i}");
            seqs.push(seq);
        }
        assert_eq!(seqs, (start + 1..=start + 6).collect::<Vec<i64>>());
        // An idempotent event is found by either function, whichever stored it.
        let tool = json!({"tool": 1});
        for (first, second) in [(Via::Scalar, Via::Arrays), (Via::Arrays, Via::Scalar)] {
            let step = format!("{first:?}");
            let event = ("tool_requested", Some(step.as_str()), &tool, true);
            let stored = append(&t.db, first, id, None, event).await.unwrap();
            assert!(stored.1);
            assert_eq!(
                append(&t.db, second, id, None, event).await.unwrap(),
                (stored.0, false)
            );
            assert_eq!(
                append(&t.db, first, id, None, event).await.unwrap(),
                (stored.0, false)
            );
        }
        let rust = runs::verify_run_chain(&t.db, run).await.unwrap();
        let sql = runs::verify_run_chain_sql(&t.db, run).await.unwrap();
        assert!(rust.valid && sql.valid, "{rust:?} {sql:?}");
        assert_eq!(head_of(&t.db, run).await, start + 8);
    }
}

#[tokio::test]
async fn a_tenant_role_cannot_call_the_scalar_append() {
    let t = test_db().await;
    let role = format!("ledger_single_{}", std::process::id());
    let conn = t.db.get().await.unwrap();
    conn.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role}; \
         SELECT pgcrew.grant_tenant_role('{role}', 'default');"
    ))
    .await
    .unwrap();
    let run = running_run(&t.db, 0).await;
    let err = conn
        .batch_execute(&format!(
            "SET ROLE {role}; SELECT * FROM pgcrew.append_event('{run}', NULL, 'note', NULL, '{{}}', false)"
        ))
        .await
        .unwrap_err();
    let code = err.as_db_error().map(|d| d.code().code().to_string());
    conn.batch_execute(&format!(
        "RESET ROLE; SELECT pgcrew.revoke_tenant_role('{role}'); DROP ROLE {role}"
    ))
    .await
    .unwrap();
    assert_eq!(code.as_deref(), Some("42501"), "{err}");
}
