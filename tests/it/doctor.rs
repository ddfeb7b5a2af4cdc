//! `pgcrew doctor`: a healthy deployment passes (TLS aside: these clusters are plaintext; see
//! doctor_tls.rs), a misconfigured one has each of its faults named, by the library and the
//! CLI, in text and JSON; bad arguments exit 2; a role without privileges gets warnings, not a
//! crash.

use std::process::Output;
use std::time::Duration;

use pgcrew::coord::instance::{self, InstanceInfo};
use pgcrew::db::{Db, TempClusterOptions};
use pgcrew::doctor::{self, CheckId, DoctorOptions, Finding, Report, Status};
use pgcrew::runs::{self, LimitPolicy, NewRun, RunOutcome};
use pgcrew::{InstanceId, LedgerKey, NewTask, RunId, TenantContext, TenantId};

use crate::common::{
    DEPLOYMENT_LEDGER_KEY, assert_contains_all, healthy_deployment, own_cluster, pgcrew_bin,
};

/// The finding of `check` (the report always has one per check).
pub fn finding(report: &Report, check: CheckId) -> &Finding {
    report
        .finding(check)
        .unwrap_or_else(|| panic!("no finding for {check}: {report:#?}"))
}

/// Run `pgcrew doctor` with `args` against `dsn` (through DATABASE_URL, with `env` added).
pub async fn doctor_cli(dsn: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(pgcrew_bin());
    cmd.arg("doctor")
        .args(args)
        .env("DATABASE_URL", dsn)
        .env_remove("PGCREW_LEDGER_KEY")
        .env_remove("PGCREW_LEDGER_KEY_FILE")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("pgcrew doctor finishes")
        .expect("run pgcrew doctor")
}

/// `pgcrew doctor` against the healthy deployment `d` as its instances are configured (instance
/// TTL, connections per instance, the deployment's ledger key): the `--json` run, then the text
/// run.
pub async fn deployment_cli(d: &crate::common::Deployment, dsn: &str) -> (Output, Output) {
    let per_instance = d.doctor_options().connections_per_instance.to_string();
    let args = [
        "--instance-ttl",
        "5s",
        "--connections-per-instance",
        per_instance.as_str(),
    ];
    let key_env = [("PGCREW_LEDGER_KEY", DEPLOYMENT_LEDGER_KEY)];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let json = doctor_cli(dsn, &json_args, &key_env).await;
    let text = doctor_cli(dsn, &args, &key_env).await;
    (json, text)
}

/// The statuses of a `--json` report by check name.
pub fn json_statuses(out: &Output) -> std::collections::BTreeMap<String, String> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json prints JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| {
            (
                f["check"].as_str().expect("check").to_string(),
                f["status"].as_str().expect("status").to_string(),
            )
        })
        .collect()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The doctor's report on `db` with the default options.
async fn default_report(db: &Db) -> Report {
    doctor::run(db, &DoctorOptions::default()).await.unwrap()
}

/// `doctor --json` (`out`) exited with `code` and gave each finding of `report` its status.
fn assert_cli_agrees(out: &Output, code: i32, report: &Report) {
    assert_eq!(out.status.code(), Some(code), "{out:?}");
    let statuses = json_statuses(out);
    for f in &report.findings {
        assert_eq!(
            statuses.get(f.check.as_str()).map(String::as_str),
            Some(f.status.as_str()),
            "{}: {}",
            f.check,
            text(out)
        );
    }
}

#[tokio::test]
async fn plaintext_healthy_deployment_passes_every_check_but_tls() {
    let (_cluster, dsn) = own_cluster(TempClusterOptions::default()).await;
    let d = healthy_deployment(&dsn).await;
    let doctor_db = Db::connect(&dsn, 1, Duration::from_secs(10)).await.unwrap();
    let report = doctor::run(&doctor_db, &d.doctor_options()).await.unwrap();
    assert_eq!(report.findings.len(), CheckId::ALL.len());
    for f in &report.findings {
        if f.check != CheckId::Tls {
            assert_eq!(f.status, Status::Pass, "{f:#?}");
            assert!(f.advice.is_none(), "{f:#?}");
        }
    }
    // The TLS check fails and names the instances' plaintext connections.
    let tls = finding(&report, CheckId::Tls);
    assert_eq!(tls.status, Status::Fail, "{tls:#?}");
    assert!(tls.message.contains("do not use TLS"), "{tls:#?}");
    assert!(!tls.items.is_empty(), "{tls:#?}");
    assert!(
        tls.items.iter().all(|i| i.contains("from 127.0.0.1:")),
        "{tls:#?}"
    );
    assert!(
        tls.advice
            .as_deref()
            .unwrap_or("")
            .contains("sslmode=verify-full")
    );
    assert!(report.failed());
    assert_eq!(report.summary.fail, 1);
    assert_eq!(report.summary.pass, CheckId::ALL.len() - 1);
    // What the checks read is the real state: the leader is one of the instances, the signed
    // run was sampled, the bound role was checked.
    let leader = &finding(&report, CheckId::Leader).message;
    assert!(
        leader.contains("doctor-a") || leader.contains("doctor-b"),
        "{leader}"
    );
    assert!(
        finding(&report, CheckId::Instances)
            .message
            .starts_with("2 instance(s)")
    );
    assert!(
        finding(&report, CheckId::LedgerSignatures)
            .message
            .contains("1 run(s)")
    );
    assert!(
        finding(&report, CheckId::TenantRoles)
            .message
            .starts_with("1 bound role(s)")
    );

    // The CLI says the same, in JSON and text; exit 1 because TLS failed.
    let (out, text_out) = deployment_cli(&d, &dsn).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let statuses = json_statuses(&out);
    assert_eq!(statuses.len(), CheckId::ALL.len());
    for (check, status) in &statuses {
        let want = if check == "tls" { "fail" } else { "pass" };
        assert_eq!(status, want, "{check}: {}", text(&out));
    }
    let out = text_out;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let t = text(&out);
    assert!(t.contains("FAIL  tls"), "{t}");
    assert!(t.contains("from 127.0.0.1:"), "{t}");
    for check in CheckId::ALL.iter().filter(|c| **c != CheckId::Tls) {
        assert!(t.contains(&format!("PASS  {check}")), "{check}: {t}");
    }
    assert!(t.contains("15 passed, 0 warning(s), 1 failed"), "{t}");
    // The doctor's own session is not counted as the deployment's.
    assert!(!t.contains("pgcrew-doctor"), "{t}");
    d.stop().await;
}

#[tokio::test]
async fn unix_socket_connections_are_reported_as_such_not_as_plaintext() {
    let (cluster, dsn) = own_cluster(TempClusterOptions::default()).await;
    // The deployment's connections come through the cluster's unix socket.
    let socket_dsn = format!(
        "host={} port={} user=postgres dbname=postgres",
        cluster.dir().display(),
        cluster.port()
    );
    let db = Db::connect(&socket_dsn, 2, Duration::from_secs(10))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    // The doctor itself over TCP: its own session is never counted.
    let doctor_db = Db::connect(&dsn, 1, Duration::from_secs(10)).await.unwrap();
    let report = default_report(&doctor_db).await;
    let tls = finding(&report, CheckId::Tls);
    assert_eq!(tls.status, Status::Pass, "{tls:#?}");
    assert!(
        tls.message
            .contains("over a unix socket, where TLS does not apply"),
        "{tls:#?}"
    );
    assert!(
        tls.message.contains("this doctor's connection: no TLS"),
        "{tls:#?}"
    );
    let conns = finding(&report, CheckId::MaxConnections);
    assert!(
        conns
            .items
            .iter()
            .any(|i| i.contains("pgcrew from a unix socket")),
        "{conns:#?}"
    );
    // A TCP connection without TLS turns it into a failure naming that one only.
    let tcp = Db::connect(&dsn, 1, Duration::from_secs(10)).await.unwrap();
    let report = default_report(&doctor_db).await;
    let tls = finding(&report, CheckId::Tls);
    assert_eq!(tls.status, Status::Fail, "{tls:#?}");
    assert_eq!(tls.items.len(), 1, "{tls:#?}");
    assert!(tls.items[0].contains("from 127.0.0.1:"), "{tls:#?}");
    drop(tcp);
}

/// Run a statement on the database (test setup).
async fn exec(db: &Db, sql: &str) {
    db.get()
        .await
        .unwrap()
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn finished_run(db: &Db, tenant: &TenantId) -> RunId {
    let run = runs::create_run(db, NewRun::new(tenant.clone()))
        .await
        .unwrap();
    runs::start_run(db, run, None, None, LimitPolicy::default())
        .await
        .unwrap();
    runs::complete_run(db, run, RunOutcome::default(), None)
        .await
        .unwrap();
    run
}

fn assert_names(f: &Finding, status: Status, names: &[&str]) {
    assert_eq!(f.status, status, "{f:#?}");
    assert!(f.advice.is_some(), "{f:#?}");
    for n in names {
        assert!(
            f.items.iter().any(|i| i.contains(n)) || f.message.contains(n),
            "{} does not name {n}: {f:#?}",
            f.check
        );
    }
}

#[tokio::test]
async fn misconfigured_deployment_has_each_fault_named() {
    let (cluster, dsn) = own_cluster(TempClusterOptions::default()).await;
    let db = Db::connect(&dsn, 4, Duration::from_secs(10)).await.unwrap();
    db.migrate().await.unwrap();

    // No leader; one live instance and one silent for ten minutes.
    for id in ["doctor-live", "doctor-stale"] {
        instance::register(
            &db,
            &InstanceInfo {
                id: InstanceId::new(id).unwrap(),
                hostname: "test-host".into(),
                pid: 4242,
                version: pgcrew::VERSION.into(),
                metadata: serde_json::json!({}),
                agents: Vec::new(),
                tools: Vec::new(),
            },
        )
        .await
        .unwrap();
    }
    exec(
        &db,
        "UPDATE pgcrew.instances SET last_heartbeat_at = now() - interval '10 minutes' WHERE id = 'doctor-stale'",
    )
    .await;

    // Tenants: one with a budget, one without.
    let acme = TenantId::new("acme").unwrap();
    let nobudget = TenantId::new("nobudget").unwrap();
    pgcrew::tenancy::upsert(
        &db,
        &TenantContext::for_id(acme.clone()).budget_usd(Some(10.0)),
    )
    .await
    .unwrap();
    pgcrew::tenancy::upsert(&db, &TenantContext::for_id(nobudget.clone()))
        .await
        .unwrap();

    // A run stuck on an instance that is gone.
    let stuck = runs::create_run(&db, NewRun::new(acme.clone()))
        .await
        .unwrap();
    runs::start_run(
        &db,
        stuck,
        Some(&InstanceId::new("doctor-gone").unwrap()),
        None,
        LimitPolicy::default(),
    )
    .await
    .unwrap();

    // A run finished without the ledger key, and one signed with a key the doctor does not have.
    let unsigned = finished_run(&db, &acme).await;
    let other_key = LedgerKey::new("another-key-the-doctor-does-not-hold-0123").unwrap();
    let forged = finished_run(&db.clone().with_ledger_key(other_key), &acme).await;

    // A task due ten minutes ago that nobody claimed.
    pgcrew::queue::enqueue(
        &db.get().await.unwrap(),
        &NewTask::new("doctor.noop", &serde_json::json!({}))
            .unwrap()
            .queue("doctor-lagging")
            .tenant(acme.clone())
            .run_at(chrono::Utc::now() - chrono::Duration::minutes(10)),
    )
    .await
    .unwrap();

    // Tenant roles: one given BYPASSRLS after binding, one admitted by a `trust` host line,
    // one missing a grant. pg_locks stays readable by PUBLIC.
    exec(
        &db,
        "CREATE ROLE doctor_evil LOGIN PASSWORD 'x';
         CREATE ROLE doctor_trusty LOGIN PASSWORD 'x';
         CREATE ROLE doctor_lacking LOGIN PASSWORD 'x';",
    )
    .await;
    pgcrew::tenancy::grant_tenant_role(&db, "doctor_evil", &acme)
        .await
        .unwrap();
    pgcrew::tenancy::grant_tenant_role(&db, "doctor_trusty", &acme)
        .await
        .unwrap();
    pgcrew::tenancy::grant_tenant_role(&db, "doctor_lacking", &nobudget)
        .await
        .unwrap();
    exec(
        &db,
        "ALTER ROLE doctor_evil BYPASSRLS;
         REVOKE SELECT ON pgcrew.events FROM doctor_lacking;",
    )
    .await;
    let hba = cluster.dir().join("data").join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all doctor_trusty 127.0.0.1/32 trust\n{old}"),
    )
    .unwrap();
    exec(&db, "SELECT pg_reload_conf()").await;

    // Server side: autovacuum off on the tasks table, a statement_timeout that is too low,
    // idle_in_transaction_session_timeout left off, and the schema one migration behind.
    exec(
        &db,
        "ALTER TABLE pgcrew.tasks SET (autovacuum_enabled = false);
         DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET statement_timeout = %L', current_database(), '2s'); END $$;
         DELETE FROM pgcrew.refinery_schema_history
          WHERE version = (SELECT max(version) FROM pgcrew.refinery_schema_history);",
    )
    .await;

    let doctor_key = LedgerKey::new(DEPLOYMENT_LEDGER_KEY).unwrap();
    let options = DoctorOptions {
        // Two instances of 1000 connections cannot fit in 300.
        connections_per_instance: 1000,
        ledger_key: Some(doctor_key),
        ..DoctorOptions::default()
    };
    let doctor_db = Db::connect(&dsn, 1, Duration::from_secs(10)).await.unwrap();
    let report = doctor::run(&doctor_db, &options).await.unwrap();
    let f = |c| finding(&report, c);
    let latest = pgcrew::db::latest_version();
    // The newest migration left (migration numbers may have gaps while a branch is unmerged).
    let behind = crate::common::scalar(
        &db,
        "SELECT max(version)::int8 FROM pgcrew.refinery_schema_history",
    )
    .await;

    assert_eq!(f(CheckId::ServerVersion).status, Status::Pass);
    assert_names(
        f(CheckId::Migrations),
        Status::Fail,
        &[&format!(
            "version {behind}; this pgcrew needs version {latest}"
        )],
    );
    assert!(
        f(CheckId::Migrations)
            .advice
            .as_deref()
            .unwrap_or("")
            .contains("pgcrew migrate")
    );
    assert_names(
        f(CheckId::MaxConnections),
        Status::Fail,
        &["2 instance(s) x 1000"],
    );
    assert_names(
        f(CheckId::IdleInTransactionTimeout),
        Status::Warn,
        &["is off"],
    );
    assert_names(f(CheckId::StatementTimeout), Status::Warn, &["2s"]);
    assert_names(
        f(CheckId::TasksAutovacuum),
        Status::Fail,
        &["autovacuum_enabled = false"],
    );
    assert_names(f(CheckId::Tls), Status::Fail, &["from 127.0.0.1:"]);
    assert_names(f(CheckId::Leader), Status::Fail, &["no leader"]);
    assert_names(f(CheckId::Instances), Status::Fail, &["doctor-stale"]);
    assert!(
        !f(CheckId::Instances)
            .items
            .iter()
            .any(|i| i.contains("doctor-live")),
        "{:#?}",
        f(CheckId::Instances)
    );
    assert_names(
        f(CheckId::StuckRuns),
        Status::Fail,
        &[&stuck.to_string(), "instance gone"],
    );
    assert_names(f(CheckId::QueueLag), Status::Warn, &["doctor-lagging"]);
    assert_names(
        f(CheckId::TenantBudgets),
        Status::Warn,
        &["tenant nobudget"],
    );
    assert!(
        !f(CheckId::TenantBudgets)
            .items
            .iter()
            .any(|i| i.contains("acme") || i.contains("default")),
        "{:#?}",
        f(CheckId::TenantBudgets)
    );
    assert_names(
        f(CheckId::TenantRoles),
        Status::Fail,
        &[
            "doctor_evil (tenant acme): has BYPASSRLS",
            "doctor_trusty (tenant acme): can log in over TCP without a password",
            "doctor_lacking (tenant nobudget): lacks SELECT on pgcrew.events",
        ],
    );
    assert_names(f(CheckId::PgLocksPublic), Status::Warn, &["3 role(s)"]);
    assert_names(
        f(CheckId::LedgerCheckpoints),
        Status::Fail,
        &[&unsigned.to_string()],
    );
    assert!(
        !f(CheckId::LedgerCheckpoints)
            .items
            .iter()
            .any(|i| i.contains(&forged.to_string())),
        "{:#?}",
        f(CheckId::LedgerCheckpoints)
    );
    assert_names(
        f(CheckId::LedgerSignatures),
        Status::Fail,
        &[&forged.to_string()],
    );
    assert!(report.failed());

    // The CLI: the same statuses in JSON; the names in text; exit 1.
    let key_file = cluster.dir().join("doctor-test.key");
    std::fs::write(&key_file, format!("{DEPLOYMENT_LEDGER_KEY}\n")).unwrap();
    let key_arg = key_file.display().to_string();
    let args = [
        "--connections-per-instance",
        "1000",
        "--key-file",
        key_arg.as_str(),
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = doctor_cli(&dsn, &json_args, &[]).await;
    assert_cli_agrees(&out, 1, &report);
    let out = doctor_cli(&dsn, &args, &[]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let t = text(&out);
    assert_contains_all(
        &t,
        &[
            "FAIL  leader",
            "FAIL  instances",
            "doctor-stale",
            "FAIL  stuck_runs",
            stuck.to_string().as_str(),
            "FAIL  tls",
            "WARN  tenant_budgets",
            "tenant nobudget",
            "doctor_evil",
            "what to do:",
        ],
    );
    // Text mode names the unsigned run too, and the summary counts each status.
    assert!(t.contains(&unsigned.to_string()), "{t}");
    assert!(
        t.contains(&format!(
            "{} passed, {} warning(s), {} failed",
            report.summary.pass, report.summary.warn, report.summary.fail
        )),
        "{t}"
    );
}

#[tokio::test]
async fn a_role_without_privileges_gets_warnings_per_check_not_a_crash() {
    let (_cluster, dsn) = own_cluster(TempClusterOptions::default()).await;
    let db = Db::connect(&dsn, 2, Duration::from_secs(10)).await.unwrap();
    db.migrate().await.unwrap();
    exec(&db, "CREATE ROLE doctor_nobody LOGIN PASSWORD 'nobody-pw'").await;
    let cfg = pgcrew::db::parse_dsn(&dsn).unwrap();
    let port = cfg.get_ports().first().copied().unwrap();
    let nobody_dsn = format!("postgres://doctor_nobody:nobody-pw@127.0.0.1:{port}/postgres");
    let nobody = Db::connect(&nobody_dsn, 1, Duration::from_secs(10))
        .await
        .unwrap();
    // Connecting checked for a pooler on a second session of the role, closed on return; on a
    // loaded machine its backend may still be listed for a moment (and, being this role's own,
    // it is not hidden from the doctor). Wait until only the pool's session is left.
    let sessions = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'doctor_nobody'";
    let one = crate::common::eventually(Duration::from_secs(10), || async {
        crate::common::scalar(&db, sessions).await == 1
    })
    .await;
    assert!(one, "doctor_nobody's sessions other than the pool's ended");
    let report = default_report(&nobody).await;
    assert_eq!(report.findings.len(), CheckId::ALL.len());
    for check in [
        CheckId::Migrations,
        CheckId::Leader,
        CheckId::Instances,
        CheckId::StuckRuns,
        CheckId::QueueLag,
        CheckId::TenantBudgets,
        CheckId::TenantRoles,
        CheckId::LedgerCheckpoints,
    ] {
        let f = finding(&report, check);
        assert_eq!(f.status, Status::Warn, "{f:#?}");
        assert!(f.message.contains("lacks a privilege"), "{f:#?}");
    }
    // Server-wide checks still run.
    assert_eq!(
        finding(&report, CheckId::ServerVersion).status,
        Status::Pass
    );
    // The owner's connections are another role's: their TLS state is hidden from this one.
    let tls = finding(&report, CheckId::Tls);
    assert_eq!(tls.status, Status::Warn, "{tls:#?}");
    assert!(tls.message.contains("belong to other roles"), "{tls:#?}");
    // The CLI (its own session being the only one of this role) says the same and exits 0:
    // warnings only.
    drop(nobody);
    let gone = crate::common::eventually(Duration::from_secs(10), || async {
        crate::common::scalar(&db, sessions).await == 0
    })
    .await;
    assert!(gone, "the library's session of doctor_nobody ended");
    assert!(!report.failed(), "{report:#?}");
    let out = doctor_cli(&nobody_dsn, &["--json"], &[]).await;
    assert_eq!(json_statuses(&out).len(), CheckId::ALL.len(), "{out:?}");
    assert_cli_agrees(&out, 0, &report);
}

#[tokio::test]
async fn bad_arguments_and_missing_configuration_exit_2() {
    let unreachable = "postgres://nobody@127.0.0.1:1/none";
    for (args, env, expect) in [
        (
            vec!["--connection-headroom", "1.5"],
            vec![],
            "--connection-headroom",
        ),
        (vec!["--instance-ttl", "soon"], vec![], "--instance-ttl"),
        (vec!["--ledger-sample", "0"], vec![], "--ledger-sample"),
        (
            vec!["--key-file", "/nonexistent/doctor.key"],
            vec![],
            "cannot read the key file",
        ),
        (
            vec![],
            vec![("PGCREW_LEDGER_KEY", "short")],
            "at least 32 are required",
        ),
        (vec![], vec![], "cannot connect"),
    ] {
        let out = doctor_cli(unreachable, &args, &env).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let out = tokio::process::Command::new(pgcrew_bin())
        .arg("doctor")
        .env_remove("DATABASE_URL")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no database given"));
}
