//! Submitting agent runs from SQL, the CLI and Python (issue #18, item 2): `pgcrew.submit_run`
//! does what the library's submit does, in the caller's transaction, with typed refusals; a
//! tenant role submits for its own tenant only.

use std::time::Duration;

use pgcrew::agent::demo::SUPPORT_AGENT;
use pgcrew::agent::{AgentDef, register_agent};
use pgcrew::runs::{self, RunState};
use pgcrew::{RunId, TenantId};
use serde_json::{Value, json};
use tokio_postgres::Client as PgClient;

use crate::agent_service::agent_service;
use crate::common::{TestDb, cli, ledger_events, scalar, tenant, test_db, wait_until};

/// `SELECT pgcrew.submit_run(...)` on `c` (agent, tenant, session, input).
async fn submit_sql<C: tokio_postgres::GenericClient>(
    c: &C,
    agent: Option<&str>,
    tenant: Option<&str>,
    session: Option<&str>,
    input: Option<Value>,
) -> Result<RunId, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT pgcrew.submit_run(p_agent => $1, p_tenant => $2, p_session => $3, p_input => $4)",
            &[&agent, &tenant, &session, &input],
        )
        .await?;
    Ok(RunId(row.get(0)))
}

/// A refused submit: what, agent, tenant, session, input, the expected SQLSTATE.
type Case<'a> = (
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<Value>,
    &'a str,
);

fn code(e: &tokio_postgres::Error) -> &str {
    e.code().map(|c| c.code()).unwrap_or("none")
}

async fn counts(t: &TestDb) -> (i64, i64, i64, i64) {
    (
        scalar(t, "SELECT count(*) FROM pgcrew.runs").await,
        scalar(t, "SELECT count(*) FROM pgcrew.sessions").await,
        scalar(t, "SELECT count(*) FROM pgcrew.events").await,
        scalar(t, "SELECT count(*) FROM pgcrew.tasks").await,
    )
}

#[tokio::test]
async fn a_run_submitted_from_sql_is_run_by_the_agent_service_and_its_ledger_verifies() {
    let t = test_db().await;
    tenant(&t.db, "acme", &[], Some(5.0)).await;
    let service = agent_service(t.db.clone(), "svc-sql", None).await.unwrap();
    let mut conn = t.db.get().await.unwrap();
    let input = json!({"prompt": "Where is order A-1001?"});
    // In the caller's transaction: a rollback leaves nothing behind.
    let tx = conn.transaction().await.unwrap();
    submit_sql(
        &*tx,
        Some(SUPPORT_AGENT),
        Some("acme"),
        Some("u"),
        Some(input.clone()),
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(counts(&t).await, (0, 0, 0, 0));
    // Committed: the instance hosting the agent runs it.
    service.start().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let run = submit_sql(
        &*tx,
        Some(SUPPORT_AGENT),
        Some("acme"),
        Some("user-42"),
        Some(json!({"prompt": "Where is order A-1001?", "channel": "web"})),
    )
    .await
    .unwrap();
    // Not visible outside the transaction before the commit.
    assert_eq!(scalar(&t, "SELECT count(*) FROM pgcrew.runs").await, 0);
    tx.commit().await.unwrap();
    let done = service
        .wait_for_run(run, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state, RunState::Completed, "{done:?}");
    assert_eq!(done.instance_id.as_deref(), Some("svc-sql"));
    assert_eq!(done.prompt.as_deref(), Some("Where is order A-1001?"));
    assert_eq!(done.metadata, json!({"channel": "web"}));
    let session = runs::get_session(&t.db, done.session_id.unwrap())
        .await
        .unwrap();
    assert_eq!(
        (session.identifier.as_str(), session.tenant_id.as_str()),
        ("user-42", "acme")
    );
    // The ledger: run_created (the library's payload) first, and the chain verifies.
    let events = ledger_events(&t.db, run).await;
    assert_eq!(events[0].0, "run_created");
    assert_eq!(
        events[0].2,
        json!({"state": "pending", "agent_name": "support", "session_id": session.id,
               "parent_run_id": null, "forked_at_seq": null})
    );
    assert_eq!(events.last().unwrap().0, "run_completed");
    let v = runs::verify_run_chain(&t.db, run).await.unwrap();
    assert!(v.valid, "{v:?}");
    // The task: the library's shape, acknowledged once the run completed.
    wait_until(
        Duration::from_secs(10),
        "the agent-run task completed",
        || async {
            scalar(
                &t,
                "SELECT count(*) FROM pgcrew.tasks WHERE state = 'completed'",
            )
            .await
                == 1
        },
    )
    .await;
    let row = conn
        .query_one(
            "SELECT queue, kind, tenant_id, run_id, unique_key, payload, state, priority, max_attempts \
             FROM pgcrew.tasks WHERE run_id = $1",
            &[&run.0],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "agent.support");
    assert_eq!(row.get::<_, String>(1), pgcrew::agent::AGENT_RUN_KIND);
    assert_eq!(row.get::<_, String>(2), "acme");
    assert_eq!(row.get::<_, uuid::Uuid>(3), run.0);
    assert_eq!(row.get::<_, String>(4), format!("agent_run:{run}"));
    assert_eq!(row.get::<_, Value>(5), json!({"run_id": run}));
    assert_eq!(row.get::<_, String>(6), "completed");
    assert_eq!(
        (row.get::<_, i16>(7), row.get::<_, i32>(8)),
        (2, 25),
        "the library's defaults"
    );
    // The same session identifier reuses the session.
    let again = submit_sql(
        &**conn,
        Some(SUPPORT_AGENT),
        Some("acme"),
        Some("user-42"),
        Some(input),
    )
    .await
    .unwrap();
    let again = runs::get_run(&t.db, again).await.unwrap();
    assert_eq!(again.session_id, Some(session.id));
    service.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_with_clear_sqlstates_and_writes_nothing() {
    let t = test_db().await;
    tenant(&t.db, "acme", &[], None).await;
    register_agent(&t.db, &AgentDef::new("support", "gpt-4o-mini"))
        .await
        .unwrap();
    let conn = t.db.get().await.unwrap();
    let prompt = || Some(json!({"prompt": "hi"}));
    let long = "x".repeat(129);
    let (s, a) = (Some("support"), Some("acme"));
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("NULL agent", None, a, None, prompt(), "22004"),
        ("NULL tenant", s, None, None, prompt(), "22004"),
        ("NULL input", s, a, None, None, "22004"),
        ("empty agent", Some(""), a, None, prompt(), "22023"),
        ("long tenant", s, Some(&long), None, prompt(), "22023"),
        ("control chars in session", s, a, Some("a\nb"), prompt(), "22023"),
        ("empty session", s, a, Some(""), prompt(), "22023"),
        ("unknown tenant", s, Some("nobody"), None, prompt(), "PC010"),
        ("unknown agent", Some("ghost"), a, None, prompt(), "PC060"),
        ("input not an object", s, a, None, Some(json!(["hi"])), "22023"),
        ("no prompt", s, a, None, Some(json!({})), "22023"),
        ("prompt not a string", s, a, None, Some(json!({"prompt": 1})), "22023"),
        ("blank prompt", s, a, Some("s"), Some(json!({"prompt": " \n\t"})), "22023"),
        ("prompt over 1 MiB", s, a, Some("s"), Some(json!({"prompt": "x".repeat(1_048_577)})), "PC040"),
    ];
    for (what, agent, tenant, session, input, expected) in cases {
        let e = submit_sql(&**conn, agent, tenant, session, input)
            .await
            .expect_err(what);
        assert_eq!(code(&e), expected, "{what}: {e:?}");
        let msg = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        assert!(!msg.is_empty(), "{what}");
    }
    assert_eq!(counts(&t).await, (0, 0, 0, 0));
    // The message of an unknown agent names it and says what to do.
    let e = submit_sql(&**conn, Some("ghost"), Some("acme"), None, prompt())
        .await
        .unwrap_err();
    let db = e.as_db_error().unwrap();
    assert!(db.message().contains("ghost"), "{}", db.message());
    assert!(db.hint().is_some());
    // Named arguments with defaults: session and input may be omitted (input then has no prompt).
    let e = conn
        .query_one(
            "SELECT pgcrew.submit_run(p_agent => 'support', p_tenant => 'acme')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22023");
    let row = conn
        .query_one(
            "SELECT pgcrew.submit_run(p_agent => 'support', p_tenant => 'acme', p_input => '{\"prompt\": \"hi\"}')",
            &[],
        )
        .await
        .unwrap();
    let run = runs::get_run(&t.db, RunId(row.get(0))).await.unwrap();
    assert_eq!((run.session_id, run.state), (None, RunState::Pending));
}

/// A LOGIN role bound to `tenant` (dropped with the returned guard).
struct TenantRole {
    t: std::sync::Arc<TestDb>,
    name: String,
    password: String,
}

impl TenantRole {
    async fn create(t: std::sync::Arc<TestDb>, bind_to: Option<&TenantId>) -> TenantRole {
        let name = format!("submitter_{}", uuid::Uuid::new_v4().simple());
        let password = uuid::Uuid::new_v4().simple().to_string();
        let conn = t.db.get().await.unwrap();
        conn.batch_execute(&format!(
            "CREATE ROLE {name} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{password}'"
        ))
        .await
        .unwrap();
        match bind_to {
            Some(tenant) => pgcrew::tenancy::grant_tenant_role(&t.db, &name, tenant)
                .await
                .map(|_| ())
                .unwrap(),
            None => conn
                .batch_execute(&format!(
                    "GRANT USAGE ON SCHEMA pgcrew TO {name}; \
                     GRANT EXECUTE ON FUNCTION pgcrew.submit_run(text, text, text, jsonb) TO {name}"
                ))
                .await
                .unwrap(),
        }
        TenantRole { t, name, password }
    }

    async fn connect(&self) -> PgClient {
        let mut cfg = self.t.db.config().clone();
        cfg.user(&self.name).password(&self.password);
        let (c, connection) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        c
    }
}

impl Drop for TenantRole {
    fn drop(&mut self) {
        // Roles are cluster-wide: drop ours (best effort, on a connection of its own).
        let cfg = self.t.db.config().clone();
        let role = self.name.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok((c, conn)) = cfg.connect(tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"))
                        .await;
                }
            });
        })
        .join()
        .ok();
    }
}

#[tokio::test]
async fn a_tenant_role_submits_for_its_own_tenant_only() {
    let t = std::sync::Arc::new(test_db().await);
    let acme = tenant(&t.db, "acme", &[], None).await;
    tenant(&t.db, "globex", &[], None).await;
    register_agent(&t.db, &AgentDef::new("support", "gpt-4o-mini"))
        .await
        .unwrap();
    let role = TenantRole::create(t.clone(), Some(&acme)).await;
    let c = role.connect().await;
    let input = || Some(json!({"prompt": "hi"}));
    // Its own tenant: accepted, and it sees its run (RLS).
    let run = submit_sql(&c, Some("support"), Some("acme"), Some("u"), input())
        .await
        .unwrap();
    let seen: i64 = c
        .query_one("SELECT count(*) FROM pgcrew.runs WHERE id = $1", &[&run.0])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 1);
    let before = counts(&t).await;
    // Another tenant, existing or not: permission denied, the same answer either way.
    for other in ["globex", "nobody"] {
        let e = submit_sql(&c, Some("support"), Some(other), Some("u"), input())
            .await
            .unwrap_err();
        assert_eq!(code(&e), "42501", "{other}: {e:?}");
    }
    // A setting changes nothing.
    c.batch_execute("SET pgcrew.tenant_id = 'globex'")
        .await
        .unwrap();
    let e = submit_sql(&c, Some("support"), Some("globex"), None, input())
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501");
    // The internal writer is not executable by it.
    let e = c
        .query_one(
            "SELECT pgcrew.create_agent_run('support', 'globex', NULL, 'hi')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501");
    // A role bound to no tenant, even with EXECUTE granted, submits for nobody.
    let unbound = TenantRole::create(t.clone(), None).await;
    let u = unbound.connect().await;
    let e = submit_sql(&u, Some("support"), Some("acme"), None, input())
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501", "{e:?}");
    assert_eq!(counts(&t).await, before);
}

#[tokio::test]
async fn cli_run_submit_prints_the_run_and_waits_for_its_end() {
    let t = test_db().await;
    tenant(&t.db, "acme", &[], Some(5.0)).await;
    let service = agent_service(t.db.clone(), "svc-cli", None).await.unwrap();
    service.start().await.unwrap();
    // Without --wait: the run id, at once.
    let out = cli(
        t.dsn(),
        [
            "run",
            "submit",
            "--agent",
            "support",
            "--tenant",
            "acme",
            "--prompt",
            "Weather in Oslo?",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let run: RunId = stdout.trim().parse().unwrap();
    assert_eq!(runs::get_run(&t.db, run).await.unwrap().session_id, None);
    // --wait: exit 0 once completed.
    let out = cli(
        t.dsn(),
        [
            "run",
            "submit",
            "--agent",
            "support",
            "--tenant",
            "acme",
            "--session",
            "cli-user",
            "--prompt",
            "Where is order A-7?",
            "--wait",
            "--timeout",
            "30s",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let run: RunId = lines.next().unwrap().parse().unwrap();
    assert!(lines.next().unwrap().starts_with("completed\t"), "{stdout}");
    let r = runs::get_run(&t.db, run).await.unwrap();
    assert_eq!(r.state, RunState::Completed);
    service.stop().await.unwrap();
    // An agent nobody hosts: the run waits; cancelled meanwhile, the CLI exits 1.
    register_agent(&t.db, &AgentDef::new("idle", "gpt-4o-mini"))
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let dsn = t.dsn().to_string();
        async move {
            cli(
                &dsn,
                [
                    "run", "submit", "--agent", "idle", "--tenant", "acme", "--prompt", "hi",
                    "--wait",
                ],
            )
            .await
        }
    });
    wait_until(Duration::from_secs(20), "the CLI submitted", || async {
        scalar(
            &t,
            "SELECT count(*) FROM pgcrew.runs WHERE agent_name = 'idle'",
        )
        .await
            == 1
    })
    .await;
    let idle: uuid::Uuid =
        t.db.get()
            .await
            .unwrap()
            .query_one("SELECT id FROM pgcrew.runs WHERE agent_name = 'idle'", &[])
            .await
            .unwrap()
            .get(0);
    runs::cancel_run(&t.db, RunId(idle), "not today")
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the CLI noticed the cancellation")
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled\tnot today"));
    // A timeout: exit 2 with the reason.
    let out = cli(
        t.dsn(),
        [
            "run",
            "submit",
            "--agent",
            "idle",
            "--tenant",
            "acme",
            "--prompt",
            "hi",
            "--wait",
            "--timeout",
            "300ms",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));
    // Bad input: exit 2, nothing written.
    let before = counts(&t).await;
    let out = cli(
        t.dsn(),
        [
            "run", "submit", "--agent", "ghost", "--tenant", "acme", "--prompt", "hi",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent not found: ghost"));
    assert_eq!(counts(&t).await, before);
}

/// The README's Python snippet (the first ```python block of "Submit from SQL, the CLI or any
/// language").
fn readme_python_snippet() -> String {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("### Submit from SQL, the CLI or any language")
        .expect("README section");
    let rest = &readme[start..];
    let open = rest.find("```python\n").expect("python block") + "```python\n".len();
    let len = rest[open..].find("```").expect("end of python block");
    rest[open..open + len].to_string()
}

/// Whether `python3` with psycopg 3 is here; without it the test is skipped unless
/// `PGCREW_REQUIRE_FAULT_TOOLS` is set (CI installs it).
fn python_with_psycopg() -> bool {
    let ok = std::process::Command::new("python3")
        .args([
            "-c",
            "import psycopg; assert tuple(map(int, psycopg.__version__.split('.')[:2])) >= (3, 2)",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var_os("PGCREW_REQUIRE_FAULT_TOOLS").is_some() {
        panic!("python3 with psycopg >= 3.2 is required (pip install 'psycopg[binary]')");
    }
    ok
}

#[tokio::test]
async fn the_readme_python_snippet_submits_and_waits_against_a_live_service() {
    if !python_with_psycopg() {
        eprintln!(
            "skipped: python3 with psycopg >= 3.2 is not installed (pip install 'psycopg[binary]')"
        );
        return;
    }
    let t = test_db().await;
    tenant(&t.db, "acme", &[], Some(5.0)).await;
    let service = agent_service(t.db.clone(), "svc-py", None).await.unwrap();
    service.start().await.unwrap();
    let snippet = readme_python_snippet();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("python3")
            .args(["-c", &snippet])
            .env("DATABASE_URL", t.dsn())
            .output(),
    )
    .await
    .expect("the snippet finished")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let run: RunId = lines
        .next()
        .and_then(|l| l.strip_prefix("submitted "))
        .expect("submitted line")
        .parse()
        .unwrap();
    assert!(lines.next().unwrap().starts_with("completed "), "{stdout}");
    let r = runs::get_run(&t.db, run).await.unwrap();
    assert_eq!(r.state, RunState::Completed);
    let session = runs::get_session(&t.db, r.session_id.unwrap())
        .await
        .unwrap();
    assert_eq!(session.identifier, "user-42");
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
    service.stop().await.unwrap();
}
