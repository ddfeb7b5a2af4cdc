//! Issue #14: a hostile tenant with SQL access. A real non-superuser role, bound to tenant
//! `evil` with `pgcrew.grant_tenant_role`, attacks tenant `acme` through settings, every
//! object pgcrew creates, NOTIFY and advisory locks.

use std::time::Duration;

use pgcrew::db::Db;
use pgcrew::runs::{self, LimitPolicy, NewEvent, NewRun, RunOutcome};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{InstanceId, RunId, TenantId};
use serde_json::json;
use tokio_postgres::Client as PgClient;

use crate::common::{TestDb, cli, first_two_columns, scalar_on, test_db};

/// A marker stored in every piece of acme's data: a tenant role must never read it.
const SECRET: &str = "ACME-SECRET-7f3a";

/// What a hostile tenant's test needs: the owner's database, acme's run, the tenant role.
struct Hostile {
    t: TestDb,
    acme_run: RunId,
    role: String,
    password: String,
}

impl Hostile {
    /// A fresh connection as the tenant role.
    async fn connect(&self) -> (PgClient, tokio::task::JoinHandle<()>) {
        connect_as(&self.t.db, &self.role, &self.password).await
    }

    async fn owner(&self) -> pgcrew::db::Conn {
        self.t.db.get().await.unwrap()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        // Roles are cluster-wide: drop ours (best effort, on a connection of its own).
        let cfg = self.t.db.config().clone();
        let role = self.role.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
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

async fn connect_as(
    db: &Db,
    role: &str,
    password: &str,
) -> (PgClient, tokio::task::JoinHandle<()>) {
    let mut cfg = db.config().clone();
    cfg.user(role).password(password);
    let (c, connection) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    (
        c,
        tokio::spawn(async move {
            let _ = connection.await;
        }),
    )
}

/// Two tenants with data everywhere (acme's carries [`SECRET`]), and a role bound to `evil`.
async fn hostile() -> Hostile {
    let t = test_db().await;
    let acme = TenantId::new("acme").unwrap();
    let evil = TenantId::new("evil").unwrap();
    tenancy::upsert(
        &t.db,
        &TenantContext::new("acme")
            .unwrap()
            .budget_usd(Some(10.0))
            .limits(None, Some(1)),
    )
    .await
    .unwrap();
    tenancy::upsert(&t.db, &TenantContext::new("evil").unwrap())
        .await
        .unwrap();
    let acme_run = seed_tenant(&t.db, &acme).await;
    seed_tenant(&t.db, &evil).await;
    let role = format!("evil_{}", uuid::Uuid::new_v4().simple());
    let password = uuid::Uuid::new_v4().simple().to_string();
    let conn = t.db.get().await.unwrap();
    conn.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{password}'"
    ))
    .await
    .unwrap();
    tenancy::grant_tenant_role(&t.db, &role, &evil)
        .await
        .unwrap();
    Hostile {
        t,
        acme_run,
        role,
        password,
    }
}

/// A session, a run with a prompt, ledger events, a task, a cost entry, a reservation, an
/// artifact and a summary for `tenant`. Returns the run (left `running`).
async fn seed_tenant(db: &Db, tenant: &TenantId) -> RunId {
    let mark = if tenant.as_str() == "acme" {
        SECRET
    } else {
        "evil-data"
    };
    let session = runs::new_session(db, tenant, "chat", json!({ "mark": mark }))
        .await
        .unwrap();
    let run = runs::create_run(
        db,
        NewRun::new(tenant.clone())
            .session(session.id)
            .agent("a")
            .prompt(format!("prompt {mark}")),
    )
    .await
    .unwrap();
    runs::start_run(db, run, None, None, LimitPolicy::Reject)
        .await
        .unwrap();
    runs::append_event(
        db,
        run,
        NewEvent::new("note", json!({ "mark": mark })),
        None,
    )
    .await
    .unwrap();
    let conn = db.get().await.unwrap();
    conn.execute(
        "INSERT INTO pgcrew.tasks (queue, kind, tenant_id, run_id, payload) VALUES ('q', 'k', $1, $2, $3)",
        &[tenant, &run, &json!({ "mark": mark })],
    )
    .await
    .unwrap();
    conn.execute(
        "INSERT INTO pgcrew.artifacts (run_id, key, version, value) VALUES ($1, 'k', 1, $2)",
        &[&run, &json!({ "mark": mark })],
    )
    .await
    .unwrap();
    conn.execute(
        "INSERT INTO pgcrew.summaries (run_id, summary_type, content_text) VALUES ($1, 's', $2)",
        &[&run, &mark],
    )
    .await
    .unwrap();
    tenancy::charge(
        db,
        tenant,
        Some(run),
        &tenancy::CostInput::llm(format!("model-{mark}"), 10, 10, 0.5),
    )
    .await
    .unwrap();
    tenancy::reserve(
        db,
        &tenancy::ReserveRequest::new(tenant.clone(), 0.1).run(run),
    )
    .await
    .unwrap();
    run
}

/// Every relation (table, view) of schema pgcrew, as the owner sees it.
async fn relations(conn: &PgClient) -> Vec<(String, String)> {
    first_two_columns(
        conn,
        "SELECT c.relname::text, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'pgcrew' AND c.relkind IN ('r', 'p', 'v', 'm') ORDER BY 1",
    )
    .await
}

/// Each relation's whole content as text (the owner's view), to prove nothing changed.
async fn snapshot(conn: &PgClient) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (rel, kind) in relations(conn).await {
        if kind == "v" {
            continue;
        }
        let text: Option<String> = conn
            .query_one(
                &format!("SELECT string_agg(t::text, E'\\n' ORDER BY t::text) FROM pgcrew.{rel} t"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        out.push((rel, text.unwrap_or_default()));
    }
    out
}

/// Everything the tenant role can read of `rel`, as text; `None` when it has no right to.
async fn read_as_tenant(c: &PgClient, rel: &str) -> Option<Vec<String>> {
    match c
        .query(&format!("SELECT t::text FROM pgcrew.{rel} t"), &[])
        .await
    {
        Ok(rows) => Some(rows.iter().map(|r| r.get(0)).collect()),
        Err(e) => {
            let code = e.code().map(|c| c.code().to_string());
            assert_eq!(
                code.as_deref(),
                Some("42501"),
                "{rel}: expected permission denied, got {e:?}"
            );
            None
        }
    }
}

/// Assert the tenant sees evil's rows of the main tables and nothing of acme's anywhere.
async fn assert_sees_only_own(h: &Hostile, c: &PgClient, context: &str) {
    let owner = h.owner().await;
    for (rel, _) in relations(&owner).await {
        if let Some(rows) = read_as_tenant(c, &rel).await {
            for row in &rows {
                assert!(
                    !row.contains(SECRET) && !row.contains("acme"),
                    "{context}: the tenant role read acme's data from pgcrew.{rel}: {row}"
                );
            }
        }
    }
    for rel in [
        "runs",
        "events",
        "tasks",
        "cost_entries",
        "tenant_costs",
        "budget_status",
    ] {
        let rows = read_as_tenant(c, rel).await.unwrap_or_default();
        assert!(
            !rows.is_empty(),
            "{context}: the tenant role should see its own rows of pgcrew.{rel}"
        );
    }
}

#[tokio::test]
async fn a_tenant_role_cannot_switch_tenants_with_a_setting() {
    let h = hostile().await;
    let (c, _task) = h.connect().await;
    assert_sees_only_own(&h, &c, "no setting").await;
    // A session setting (what V004's policies read).
    c.batch_execute("SET pgcrew.tenant_id = 'acme'")
        .await
        .unwrap();
    assert_sees_only_own(&h, &c, "SET pgcrew.tenant_id").await;
    // Inside one statement, which no pooler can block.
    let rows = c
        .query(
            "SELECT set_config('pgcrew.tenant_id', 'acme', false), r::text FROM pgcrew.runs r",
            &[],
        )
        .await
        .unwrap();
    for r in &rows {
        let text: String = r.get(1);
        assert!(
            !text.contains(SECRET),
            "set_config in the statement: {text}"
        );
    }
    assert_sees_only_own(&h, &c, "set_config").await;
    // Pinned on the role (the documented way before V010).
    h.owner()
        .await
        .batch_execute(&format!(
            "ALTER ROLE {} SET pgcrew.tenant_id = 'acme'",
            h.role
        ))
        .await
        .unwrap();
    let (c2, _task2) = h.connect().await;
    assert_sees_only_own(&h, &c2, "ALTER ROLE ... SET").await;
    // No way into another role it is not a member of.
    assert!(c2.batch_execute("SET ROLE postgres").await.is_err());
    assert!(
        c2.query_one("SELECT set_config('role', 'postgres', false)", &[])
            .await
            .is_err()
    );
    let tenant: Option<String> = c2
        .query_one("SELECT pgcrew.current_tenant()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tenant.as_deref(), Some("evil"));
}

#[tokio::test]
async fn sweep_as_a_tenant_role_over_every_object_pgcrew_creates() {
    let h = hostile().await;
    let owner = h.owner().await;
    let (c, _task) = h.connect().await;
    let before = snapshot(&owner).await;
    // Reads: covered relation by relation.
    assert_sees_only_own(&h, &c, "sweep").await;
    // Writes: every table, every kind of statement, refused; nothing changes.
    for (rel, kind) in relations(&owner).await {
        let col: String = owner
            .query_one(
                "SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = ('pgcrew.' || quote_ident($1))::regclass \
                 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum LIMIT 1",
                &[&rel],
            )
            .await
            .unwrap()
            .get(0);
        let mut statements = vec![
            format!("INSERT INTO pgcrew.{rel} DEFAULT VALUES"),
            format!("INSERT INTO pgcrew.{rel} SELECT * FROM pgcrew.{rel}"),
            format!("UPDATE pgcrew.{rel} SET {col} = {col}"),
            format!("DELETE FROM pgcrew.{rel}"),
        ];
        if kind != "v" {
            statements.push(format!("TRUNCATE pgcrew.{rel}"));
            statements.push(format!("LOCK TABLE pgcrew.{rel} IN ACCESS EXCLUSIVE MODE"));
        }
        for sql in statements {
            let r = c.batch_execute(&sql).await;
            assert!(r.is_err(), "the tenant role could run: {sql}");
        }
    }
    // Functions: only what reading needs is executable, and lock keys cannot be computed.
    let executable: Vec<String> = owner
        .query(
            "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'pgcrew' AND has_function_privilege($1, p.oid, 'EXECUTE') ORDER BY 1",
            &[&h.role],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for f in &executable {
        assert!(
            f == "current_tenant"
                || f == "verify_run_chain"
                || f == "ledger_event_hash"
                || f == "submit_run"
                || f.starts_with("event_hash"),
            "the tenant role may execute pgcrew.{f}"
        );
    }
    for sql in [
        "SELECT pgcrew.lock_key('run', 'x')".to_string(),
        format!("SELECT pgcrew.lock_run('{}')", h.acme_run),
        "SELECT * FROM pgcrew.claim_tasks(ARRAY['q'], 10, 'x')".into(),
        format!(
            "SELECT * FROM pgcrew.grant_tenant_role('{}', 'acme')",
            h.role
        ),
        format!("SELECT pgcrew.revoke_tenant_role('{}')", h.role),
        format!(
            "SELECT * FROM pgcrew.append_events('{}', NULL, ARRAY['x'], ARRAY[NULL::text], ARRAY['{{}}'::jsonb], ARRAY[false])",
            h.acme_run
        ),
        "SELECT * FROM pgcrew.installation_secret".into(),
        "SELECT * FROM pgcrew.tenant_roles".into(),
        "SELECT nextval('pgcrew.leader_term_seq')".into(),
    ] {
        let e = c.query(&sql, &[]).await.expect_err(&sql);
        assert_eq!(
            e.code().map(|c| c.code()),
            Some("42501"),
            "{sql}: expected permission denied, got {e:?}"
        );
    }
    // Chain verification of another tenant's run reveals nothing.
    let row = c
        .query_one(
            &format!(
                "SELECT checked FROM pgcrew.verify_run_chain('{}')",
                h.acme_run
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0);
    assert_eq!(
        before,
        snapshot(&owner).await,
        "the tenant role changed data"
    );
}

#[tokio::test]
async fn notifications_tell_a_tenant_role_nothing_about_other_tenants() {
    let h = hostile().await;
    let mut cfg = h.t.db.config().clone();
    cfg.user(&h.role).password(&h.password);
    let (c, mut rx, _task) = {
        let (client, mut connection) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut s = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(m)) = s.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = m {
                    let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
                }
            }
        });
        (client, rx, task)
    };
    for ch in pgcrew::coord::notify::CHANNELS {
        c.batch_execute(&format!("LISTEN {ch}")).await.unwrap();
    }
    // acme's activity: a run through its states, ledger events, a budget crossing every
    // threshold, a task enqueued, claimed and cancelled.
    let db = &h.t.db;
    let acme = TenantId::new("acme").unwrap();
    let run = runs::create_run(db, NewRun::new(acme.clone()).prompt(SECRET))
        .await
        .unwrap();
    runs::start_run(db, run, None, None, LimitPolicy::Reject)
        .await
        .unwrap();
    runs::append_event(db, run, NewEvent::new("note", json!({ "m": SECRET })), None)
        .await
        .unwrap();
    runs::complete_run(db, run, RunOutcome::default(), None)
        .await
        .unwrap();
    for _ in 0..3 {
        tenancy::charge(db, &acme, None, &tenancy::CostInput::llm("m", 1, 1, 3.0))
            .await
            .unwrap();
    }
    let owner = h.owner().await;
    let task = scalar_on(&owner, "SELECT id FROM pgcrew.enqueue_task('acme-q', 'k', 'acme', NULL, 0::smallint, '{}'::jsonb, 0, NULL, 3, NULL, NULL)").await;
    owner
        .query(
            "SELECT * FROM pgcrew.claim_tasks(ARRAY['acme-q'], 1, 'w')",
            &[],
        )
        .await
        .unwrap();
    owner
        .query("SELECT * FROM pgcrew.cancel_task($1)", &[&task])
        .await
        .unwrap();
    // Collect until quiet.
    let mut got = Vec::new();
    while let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await {
        got.push(n);
    }
    let channels: std::collections::BTreeSet<&str> = got.iter().map(|(c, _)| c.as_str()).collect();
    for expected in [
        "pgcrew_run_state_changed",
        "pgcrew_run_event",
        "pgcrew_budget_status_changed",
        "pgcrew_task_cancel_requested",
    ] {
        assert!(
            channels.contains(expected),
            "the tenant role received nothing on {expected} (got {got:?}): the probe did not run"
        );
    }
    let forbidden = [
        "acme",
        SECRET,
        "tenant",
        "pending",
        "running",
        "completed",
        "HEALTHY",
        "WARNING",
        "CRITICAL",
        "EXCEEDED",
        "status",
    ];
    for (channel, payload) in &got {
        for word in forbidden {
            assert!(
                !payload.contains(word),
                "{channel} told the tenant role `{word}`: {payload}"
            );
        }
    }
    drop(c);
}

#[tokio::test]
async fn advisory_locks_a_tenant_role_can_name_block_no_one() {
    let h = hostile().await;
    let (c, _task) = h.connect().await;
    let run = h.acme_run;
    // Every key the tenant can derive from public values: V002's run key, V003's tenant
    // task-limit key, the run-admission key, the migrators' legacy key.
    c.query(
        "SELECT pg_advisory_lock(1885827701, hashtext($1::text)), \
                pg_advisory_lock(1885827700, hashtext('acme')), \
                pg_advisory_lock(hashtextextended('pgcrew.tenant_tasks:acme', 0)), \
                pg_advisory_lock(8099479226012483585)",
        &[&run.to_string()],
    )
    .await
    .unwrap();
    // And the derivation itself is out of reach.
    assert!(
        c.query_one("SELECT pgcrew.lock_key('run', $1)", &[&run.to_string()])
            .await
            .is_err()
    );
    let db = h.t.db.clone();
    // Ledger appends, leases, transitions of acme's run.
    let appended = tokio::time::timeout(
        Duration::from_secs(10),
        runs::append_event(&db, run, NewEvent::new("after", json!({})), None),
    )
    .await;
    within("an append", appended).unwrap();
    let lease = tokio::time::timeout(
        Duration::from_secs(10),
        runs::acquire_run_lease(&db, run, "owner-1", Duration::from_secs(30)),
    )
    .await;
    within("a lease", lease).unwrap();
    // Run admission of acme (tenant lock).
    let acme = TenantId::new("acme").unwrap();
    let fresh = runs::create_run(&db, NewRun::new(acme.clone()))
        .await
        .unwrap();
    let started = tokio::time::timeout(
        Duration::from_secs(10),
        runs::start_run(&db, fresh, None, None, LimitPolicy::Reject),
    )
    .await;
    within("run admission", started).unwrap();
    // Task claims of acme, whose task limit takes the tenant lock: acme's one task is claimed.
    let instance = InstanceId::new("w1").unwrap();
    let claimed = tokio::time::timeout(
        Duration::from_secs(10),
        pgcrew::queue::claim(&db.get().await.unwrap(), &["q".to_string()], 10, &instance),
    )
    .await;
    let claimed = within("a claim", claimed).unwrap();
    assert!(
        claimed.iter().any(|t| t.tenant.as_str() == "acme"),
        "acme's task was not claimed while the tenant role held its old limit key: {claimed:?}"
    );
    // Migrators.
    let migrated = tokio::time::timeout(Duration::from_secs(10), db.migrate()).await;
    within("a migration", migrated).unwrap();
}

#[tokio::test]
async fn cli_grant_role_and_revoke_role() {
    let t = test_db().await;
    tenancy::upsert(&t.db, &TenantContext::new("acme").unwrap())
        .await
        .unwrap();
    let role = format!("reader_{}", uuid::Uuid::new_v4().simple());
    let password = uuid::Uuid::new_v4().simple().to_string();
    let owner = t.db.get().await.unwrap();
    owner
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        .await
        .unwrap();
    let tenants_cli =
        |args: Vec<String>| cli(t.dsn(), std::iter::once("tenants".to_string()).chain(args));
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let superuser: String = owner
        .query_one(
            "SELECT rolname::text FROM pg_roles WHERE rolsuper ORDER BY oid LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Bad input: a clear error, exit 2, nothing bound.
    for (args, says) in [
        (
            s(&["grant-role", "no_such_role_x", "acme"]),
            "does not exist",
        ),
        (
            s(&["grant-role", &role, "no-such-tenant"]),
            "tenant \"no-such-tenant\" does not exist",
        ),
        (s(&["grant-role", &superuser, "acme"]), "superuser"),
    ] {
        let out = tenants_cli(args.clone()).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(err.contains("SQLSTATE"), "{args:?}: {err}");
    }
    assert!(tenancy::list_tenant_roles(&t.db).await.unwrap().is_empty());
    // Grant: the role reads acme's rows; the CLI warns that pg_locks shows held lock keys.
    let out = tenants_cli(s(&["grant-role", &role, "acme"])).await;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("REVOKE SELECT ON pg_catalog.pg_locks FROM PUBLIC"),
        "{err}"
    );
    let out = tenants_cli(s(&["roles", "--json"])).await;
    let roles: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(roles[0]["role"], json!(role));
    assert_eq!(roles[0]["tenant_id"], json!("acme"));
    let (c, _task) = connect_as(&t.db, &role, &password).await;
    let n = scalar_on(&c, "SELECT count(*) FROM pgcrew.tenants").await;
    assert_eq!(n, 1);
    // Bound to another tenant: refused until revoked.
    tenancy::upsert(&t.db, &TenantContext::new("other").unwrap())
        .await
        .unwrap();
    let out = tenants_cli(s(&["grant-role", &role, "other"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already bound to tenant \"acme\""));
    // Revoke: no access at all.
    let out = tenants_cli(s(&["revoke-role", &role])).await;
    assert_eq!(out.status.code(), Some(0));
    let e = c
        .query_one("SELECT count(*) FROM pgcrew.tenants", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42501"));
    drop(c);
    owner
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}

/// The result of an operation that must not have been blocked by a tenant's locks.
fn within<T>(what: &str, r: Result<T, tokio::time::error::Elapsed>) -> T {
    r.unwrap_or_else(|_| panic!("{what} was blocked by the tenant role's advisory locks"))
}

#[tokio::test]
async fn bench_rls_smoke() {
    let (t, v, stderr) = crate::common::run_bench("rls --events 2000 --runs 20 --samples 2").await;
    let reads = v["reads"].as_array().unwrap();
    assert_eq!(reads.len(), 3);
    // Each read returns the same rows for owner and tenant role (the bench checks), and the
    // tenant's half of the ledger is what the scan reads.
    assert_eq!(reads[0]["rows"], json!(100));
    assert_eq!(reads[1]["rows"], json!(100));
    assert_eq!(reads[2]["rows"], json!(1000));
    for r in reads {
        assert!(r["owner_ms"].as_f64().unwrap() > 0.0);
        assert!(r["tenant_ms"].as_f64().unwrap() > 0.0);
    }
    crate::common::assert_bench_database_dropped(&t, &stderr).await;
    // The bench's role is gone too.
    let owner = t.db.get().await.unwrap();
    let roles = scalar_on(
        &owner,
        "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'pgcrew_bench_%'",
    )
    .await;
    assert_eq!(roles, 0);
}

#[tokio::test]
async fn held_advisory_lock_keys_are_hidden_once_pg_locks_is_revoked() {
    let h = hostile().await;
    let (c, _task) = h.connect().await;
    // acme's transaction holds its run lock.
    let mut owner = h.owner().await;
    let tx = owner.transaction().await.unwrap();
    tx.execute("SELECT pgcrew.lock_run($1)", &[&h.acme_run])
        .await
        .unwrap();
    let spy = "SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory'";
    // By default PostgreSQL shows every role the held keys: this is the exposure the README
    // documents, and what grant-role warns about.
    let seen: i64 = c.query_one(spy, &[]).await.unwrap().get(0);
    assert!(
        seen >= 1,
        "the held key should be visible before the hardening"
    );
    assert!(tenancy::pg_locks_readable_by_public(&h.t.db).await.unwrap());
    // The documented hardening, run as a superuser in the pgcrew database.
    h.t.db
        .get()
        .await
        .unwrap()
        .batch_execute("REVOKE SELECT ON pg_catalog.pg_locks FROM PUBLIC")
        .await
        .unwrap();
    let e = c.query_one(spy, &[]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42501"));
    assert!(!tenancy::pg_locks_readable_by_public(&h.t.db).await.unwrap());
    tx.rollback().await.unwrap();
}
