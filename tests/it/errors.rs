//! Issue #15, errors shown to people: PostgreSQL's message, SQLSTATE, detail and constraint,
//! and the CLI prints each error once.

use crate::common::{assert_contains_all, cli, pgcrew_bin, test_db};

#[tokio::test]
async fn database_errors_carry_postgres_message_sqlstate_detail_and_constraint() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    // `default` exists from the migration: a unique violation.
    let e = conn
        .execute("INSERT INTO pgcrew.tenants (id) VALUES ('default')", &[])
        .await
        .unwrap_err();
    let shown = pgcrew::Error::from(e).to_string();
    assert_contains_all(
        &shown,
        &[
            "duplicate key value violates unique constraint",
            "SQLSTATE 23505",
            "detail: Key (id)=(default) already exists",
            "constraint: tenants_pkey",
        ],
    );
    assert!(!shown.contains("db error"), "{shown}");
    // A deadlock and a constraint violation are told apart by their SQLSTATE.
    let e = conn
        .execute(
            "DO $$ BEGIN RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END $$",
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        pgcrew::Error::from(e)
            .to_string()
            .contains("deadlock detected (SQLSTATE 40P01)")
    );
}

#[tokio::test]
async fn the_cli_prints_an_error_once() {
    // Nothing listens on port 1.
    let out = tokio::process::Command::new(pgcrew_bin())
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .arg("instances")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("Connection refused").count(),
        1,
        "the error should be printed once:\n{stderr}"
    );
    // And a database error from a command, too (the tenant does not exist).
    let t = test_db().await;
    let out = cli(
        t.dsn(),
        ["tenants", "grant-role", "no_such_role_y", "default"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("does not exist").count(), 1, "{stderr}");
    assert!(stderr.contains("SQLSTATE 42704"), "{stderr}");
}
