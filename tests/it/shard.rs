//! Tenants sharded across PostgreSQL clusters (issue #22): the routing map's bad input, the
//! `ShardedClient` on two throwaway clusters (work lands on the tenant's cluster only; a cluster
//! that stops fails only its tenants), and the tenant move (chains valid on the target, signed
//! checkpoints verify, a tenant that does not drain is not moved).

use std::time::Duration;

use pgcrew::agent::{AgentDef, register_agent};
use pgcrew::coord::notify::{Event, EventKind};
use pgcrew::db::{ScratchDatabase, TempCluster, TempClusterOptions};
use pgcrew::runs::{self, RunOutcome};
use pgcrew::shard::{MoveOptions, RoutingMap, ShardedClient, move_tenant};
use pgcrew::{Db, Error, LedgerKey, RunId, TenantId};
use serde_json::json;

use crate::common::{append_notes, started_run, task, tenant};
use crate::common::{own_cluster, scalar};

const KEY: &[u8] = b"the deployment's ledger key: 32+ bytes long";
const OTHER_KEY: &[u8] = b"another installation's ledger key, 32+ bytes";

/// A throwaway cluster on `port` (from this module's range 5530-5539) with a migrated scratch
/// database, its DSN and a pool on it.
async fn shard_cluster(port: u16) -> (TempCluster, ScratchDatabase, Db) {
    let (cluster, admin) = own_cluster(TempClusterOptions {
        port: Some(port),
        ..Default::default()
    })
    .await;
    let scratch = ScratchDatabase::create(&admin, "shard").await.unwrap();
    let db = Db::connect(scratch.dsn(), 4, Duration::from_secs(5))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    (cluster, scratch, db)
}

fn map(json: serde_json::Value) -> RoutingMap {
    RoutingMap::from_json(&json.to_string()).unwrap()
}

fn two_shards(a: &ScratchDatabase, b: &ScratchDatabase, routes: RoutingMap) -> ShardedClient {
    ShardedClient::builder()
        .shard("a", a.dsn())
        .shard("b", b.dsn())
        .routes(routes)
        .connect_timeout(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(200))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_bad_routing_map_is_refused_when_loaded() {
    let twice = RoutingMap::from_json(r#"{"shards": {"a": ["acme"], "b": ["acme"]}}"#);
    assert!(
        matches!(&twice, Err(Error::TenantInTwoShards { tenant, first, second })
            if tenant == "acme" && first == "a" && second == "b"),
        "{twice:?}"
    );
    let listed_twice = RoutingMap::from_json(r#"{"shards": {"a": ["acme", "acme"]}}"#);
    assert!(
        matches!(&listed_twice, Err(Error::TenantInTwoShards { .. })),
        "{listed_twice:?}"
    );
    let unknown = ShardedClient::builder()
        .shard("a", "postgres://root@127.0.0.1:5432/test")
        .routes(map(json!({"shards": {"a": ["acme"], "c": ["globex"]}})))
        .build();
    let e = unknown.unwrap_err();
    assert!(
        matches!(&e, Error::UnknownShard { shard, tenant, .. }
            if shard == "c" && tenant.as_deref() == Some("globex")),
        "{e}"
    );
    assert!(e.to_string().contains("configured: a"), "{e}");
    let bad_target =
        RoutingMap::from_json(r#"{"shards": {"a": ["acme"]}, "moving": {"acme": "z"}}"#);
    assert!(
        matches!(&bad_target, Err(Error::UnknownShard { shard, .. }) if shard == "z"),
        "{bad_target:?}"
    );
    let not_json = RoutingMap::from_json(r#"{"shard": {}}"#);
    crate::common::assert_invalid_input(&not_json.unwrap_err(), "routing map");
    let c = ShardedClient::builder()
        .shard("a", "postgres://root@127.0.0.1:5432/test")
        .routes(map(json!({"shards": {"a": ["acme"]}})))
        .build()
        .unwrap();
    let e = c
        .enqueue(&task("x").tenant(TenantId::new("nobody").unwrap()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::TenantNotRouted { tenant } if tenant == "nobody"),
        "{e}"
    );
    let dup = ShardedClient::builder()
        .shard("a", "postgres://root@127.0.0.1:5432/test")
        .shard("a", "postgres://root@127.0.0.1:5432/test")
        .routes(map(json!({"shards": {"a": []}})))
        .build();
    crate::common::assert_invalid_input(&dup.unwrap_err(), "shards");
}

#[tokio::test]
async fn each_tenants_work_lands_on_its_cluster_and_a_stopped_cluster_stops_only_its_tenants() {
    let (ca, sa, da) = shard_cluster(5530).await;
    let (cb, sb, db) = shard_cluster(5531).await;
    let acme = tenant(&da, "acme", &[], None).await;
    let globex = tenant(&db, "globex", &[], None).await;
    for d in [&da, &db] {
        register_agent(d, &AgentDef::new("support", "gpt-4o-mini"))
            .await
            .unwrap();
    }
    let c = two_shards(
        &sa,
        &sb,
        map(json!({"shards": {"a": ["acme"], "b": ["globex"]}})),
    );
    let mut events = c
        .subscribe(&acme, &[EventKind::RunStateChanged])
        .await
        .unwrap();
    for t in [&acme, &globex] {
        for _ in 0..3 {
            c.enqueue(&task("noop").tenant(t.clone())).await.unwrap();
        }
    }
    let ids = c
        .enqueue_many(&[
            task("noop").tenant(acme.clone()),
            task("noop").tenant(globex.clone()),
        ])
        .await
        .unwrap();
    assert_eq!(
        c.get_task(&acme, ids[0]).await.unwrap().tenant_id,
        acme,
        "ids come back in input order"
    );
    assert_eq!(c.get_task(&globex, ids[1]).await.unwrap().tenant_id, globex);
    let input = json!({"prompt": "Where is order A-1?"});
    let run_a = c
        .submit_run("support", &acme, Some("s1"), &input)
        .await
        .unwrap();
    let run_b = c
        .submit_run("support", &globex, Some("s1"), &input)
        .await
        .unwrap();
    // The run-state notification of acme's run arrives through acme's cluster.
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.recv().await {
            if matches!(e, Event::RunStateChanged { run_id } if run_id == run_a) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(seen, "acme's run-state notification");
    for (d, mine, other) in [(&da, "acme", "globex"), (&db, "globex", "acme")] {
        for table in ["tasks", "runs", "events", "sessions"] {
            let sql =
                |t: &str| format!("SELECT count(*) FROM pgcrew.{table} WHERE tenant_id = '{t}'");
            assert!(scalar(d, &sql(mine)).await > 0, "{mine}'s {table}");
            assert_eq!(
                scalar(d, &sql(other)).await,
                0,
                "{other}'s {table} on {mine}'s cluster"
            );
        }
    }
    assert_eq!(c.get_run(&acme, run_a).await.unwrap().tenant_id, acme);
    let e = c.get_run(&acme, run_b).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");

    // Cluster b stops: globex's operations fail with ShardDown, acme's go on.
    cb.stop_server("immediate").unwrap();
    let e = c
        .enqueue(&task("noop").tenant(globex.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ShardDown { shard, .. } if shard == "b"),
        "{e}"
    );
    let e = c.get_run(&globex, run_b).await.unwrap_err();
    assert!(matches!(&e, Error::ShardDown { .. }), "{e}");
    c.enqueue(&task("noop").tenant(acme.clone())).await.unwrap();
    c.submit_run("support", &acme, Some("s1"), &input)
        .await
        .unwrap();
    assert_eq!(
        scalar(
            &da,
            "SELECT count(*) FROM pgcrew.tasks WHERE tenant_id = 'acme' AND kind = 'noop'"
        )
        .await,
        5
    );
    c.close().await;
    drop((sa, ca));
}

/// A finished run of `tenant` with `n` notes, signed with the keyed pool's key.
async fn finished_run(keyed: &Db, tenant: &TenantId, n: usize) -> RunId {
    let run = started_run(keyed, tenant).await;
    append_notes(keyed, run, n).await;
    runs::complete_run(keyed, run, RunOutcome::default(), None)
        .await
        .unwrap();
    run
}

#[tokio::test]
async fn moving_a_tenant_keeps_every_chain_valid_and_switches_the_map() {
    let (_ca, sa, da) = shard_cluster(5532).await;
    let (_cb, sb, db) = shard_cluster(5533).await;
    let key = LedgerKey::new(KEY).unwrap();
    let keyed = da.clone().with_ledger_key(key.clone());
    let acme = tenant(&da, "acme", &[], Some(10.0)).await;
    let stay = tenant(&da, "stay", &[], None).await;
    let mut moved = Vec::new();
    for n in [0, 3, 40] {
        moved.push(finished_run(&keyed, &acme, n).await);
    }
    // A run still running: the first move cannot drain the tenant.
    let parked = started_run(&keyed, &acme).await;
    append_notes(&keyed, parked, 2).await;
    let other = finished_run(&keyed, &stay, 2).await;
    // A finished task of acme (history, deleted with the tenant on the source).
    let t = c_enqueue(&da, &acme).await;
    crate::common::cancel_task(&da, t).await;
    let dir = std::env::temp_dir().join(format!("pgcrew-routes-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("routes.json");
    map(json!({"shards": {"a": ["acme", "stay"], "b": []}}))
        .save(&file)
        .unwrap();
    let c = ShardedClient::builder()
        .shard("a", sa.dsn())
        .shard("b", sb.dsn())
        .routes_file(&file)
        .build()
        .unwrap();

    // Not drained (the parked run is running, not waiting): nothing moves, the mark is gone.
    let mut opts = MoveOptions::new(acme.clone(), "a", "b");
    opts.drain_timeout = Duration::from_millis(300);
    opts.ledger_key = Some(key.clone());
    opts.routes_file = Some(file.clone());
    let e = move_tenant(&c, &opts).await.unwrap_err();
    assert!(
        matches!(&e, Error::TenantTransfer { message, .. } if message.contains("not drained")),
        "{e}"
    );
    assert_eq!(RoutingMap::load(&file).unwrap().moving_to("acme"), None);
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM pgcrew.tenants WHERE id = 'acme'").await,
        0
    );
    runs::complete_run(&keyed, parked, RunOutcome::default(), None)
        .await
        .unwrap();
    moved.push(parked);

    let heads: Vec<i64> = {
        let mut h = Vec::new();
        for r in &moved {
            h.push(runs::verify_run_chain(&da, *r).await.unwrap().head_seq);
        }
        h
    };
    let report = move_tenant(&c, &opts).await.unwrap();
    assert_eq!(report.runs, moved.len());
    assert!(report.events >= 45, "{report:?}");

    // On the target: every chain valid at the source's head, signed checkpoints verify.
    for (run, head) in moved.iter().zip(&heads) {
        let v = runs::verify_run_chain(&db, *run).await.unwrap();
        assert!(v.valid, "{run}: {v:?}");
        assert_eq!(v.head_seq, *head);
        let sql = runs::verify_run_chain_sql(&db, *run).await.unwrap();
        assert!(sql.valid, "{run}: {sql:?}");
        let signed = runs::verify_run_chain_signed(&db, *run, &key)
            .await
            .unwrap();
        assert!(signed.valid, "{run}: {signed:?}");
    }
    // Budgets and costs came along; the source keeps nothing of acme, and all of `stay`.
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM pgcrew.tenants WHERE id = 'acme' AND budget_usd_limit = 10"
        )
        .await,
        1
    );
    for table in ["tenants", "runs", "events", "tasks"] {
        let col = if table == "tenants" {
            "id"
        } else {
            "tenant_id"
        };
        let q = format!("SELECT count(*) FROM pgcrew.{table} WHERE {col} = 'acme'");
        assert_eq!(
            scalar(&da, &q).await,
            0,
            "acme's {table} left on the source"
        );
    }
    assert!(runs::verify_run_chain(&da, other).await.unwrap().valid);
    // The map switched, on disk and in the client: reads go to b.
    let routes = RoutingMap::load(&file).unwrap();
    assert_eq!(routes.shard_of("acme").unwrap(), "b");
    assert_eq!(routes.moving_to("acme"), None);
    assert_eq!(c.get_run(&acme, moved[1]).await.unwrap().tenant_id, acme);
    // Appending to a moved run's ledger on the target still checks the chain (new run works).
    let fresh = started_run(&db.clone().with_ledger_key(key.clone()), &acme).await;
    append_notes(&db, fresh, 2).await;
    assert!(runs::verify_run_chain(&db, fresh).await.unwrap().valid);

    // Moving it back to a shard with another ledger key: checkpoints are signed again.
    let other_key = LedgerKey::new(OTHER_KEY).unwrap();
    runs::complete_run(
        &db.clone().with_ledger_key(key.clone()),
        fresh,
        RunOutcome::default(),
        None,
    )
    .await
    .unwrap();
    let mut back = MoveOptions::new(acme.clone(), "b", "a");
    back.ledger_key = Some(key.clone());
    back.target_ledger_key = Some(other_key.clone());
    back.routes_file = Some(file.clone());
    let report = move_tenant(&c, &back).await.unwrap();
    assert!(report.checkpoints_resigned > 0, "{report:?}");
    for run in moved.iter().chain([&fresh]) {
        let signed = runs::verify_run_chain_signed(&da, *run, &other_key)
            .await
            .unwrap();
        assert!(signed.valid, "{run}: {signed:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

async fn c_enqueue(db: &Db, tenant: &TenantId) -> pgcrew::TaskId {
    let conn = db.get().await.unwrap();
    pgcrew::queue::enqueue(&conn, &task("noop").tenant(tenant.clone()))
        .await
        .unwrap()
        .id
}

#[tokio::test]
async fn the_transfer_functions_refuse_outside_a_transfer() {
    let t = crate::common::test_db().await;
    let conn = t.db.get().await.unwrap();
    for sql in [
        "SELECT pgcrew.import_tenant('{}')",
        "SELECT pgcrew.import_run_events('[]')",
        "SELECT pgcrew.delete_tenant('default')",
    ] {
        let e = conn.query_one(sql, &[]).await.unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("PC130"), "{sql}: {e}");
    }
    // The guards still refuse a ledger head written outside a transfer.
    let e = conn
        .execute(
            "INSERT INTO pgcrew.runs (id, tenant_id, ledger_head_seq) VALUES (gen_random_uuid(), 'default', 3)",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("PC005"), "{e}");
}

/// `pgcrew shard <args>` with the shard DSNs `env` (`PGCREW_SHARD_<NAME>`) and no ledger key:
/// (exit code, stdout, stderr).
async fn shard_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(crate::common::pgcrew_bin());
    cmd.arg("shard")
        .args(args)
        .env_remove("PGCREW_LEDGER_KEY")
        .env_remove("PGCREW_LEDGER_KEY_FILE")
        .env_remove("PGCREW_SHARD_A")
        .env_remove("PGCREW_SHARD_B")
        .env_remove("PGCREW_SHARD_C");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The CLI over two throwaway clusters: `shard check` and `shard move` (the run's chain valid
/// on the target, the routing file switched), and the bad input through exit code and message:
/// a shard with no DSN configured, a tenant in two shards, a move to an unknown shard, a shard
/// that is down.
#[tokio::test]
async fn the_shard_cli_checks_and_moves_and_refuses_bad_input() {
    let (_ca, sa, da) = shard_cluster(5534).await;
    let (cb, sb, db) = shard_cluster(5535).await;
    let acme = tenant(&da, "acme", &[], None).await;
    let run = finished_run(&da, &acme, 3).await;
    let head = runs::verify_run_chain(&da, run).await.unwrap().head_seq;
    let dir = std::env::temp_dir().join(format!("pgcrew-cli-routes-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("routes.json");
    let routes = file.to_str().unwrap();
    map(json!({"shards": {"a": ["acme"], "b": []}}))
        .save(&file)
        .unwrap();
    let env = [("PGCREW_SHARD_A", sa.dsn()), ("PGCREW_SHARD_B", sb.dsn())];

    // check: both shards up, where each tenant lives.
    let (code, out, err) = shard_cli(&["check", "--routes", routes, "--json"], &env).await;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["routes"]["shards"]["a"], json!(["acme"]), "{v}");
    assert_eq!(v["unreachable"], json!([]), "{v}");

    // A move to a shard the map does not name: refused, nothing moved.
    let (code, out, err) = shard_cli(
        &[
            "move", "--routes", routes, "--tenant", "acme", "--from", "a", "--to", "z",
        ],
        &env,
    )
    .await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("shard `z`"), "{err}");
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM pgcrew.tenants WHERE id = 'acme'").await,
        0
    );

    // move a -> b: the run's chain is valid on b at the same head; the file says b.
    let (code, out, err) = shard_cli(
        &[
            "move", "--routes", routes, "--tenant", "acme", "--from", "a", "--to", "b", "--json",
        ],
        &env,
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["runs"], 1, "{report}");
    let v = runs::verify_run_chain(&db, run).await.unwrap();
    assert!(v.valid, "{v:?}");
    assert_eq!(v.head_seq, head);
    assert_eq!(
        scalar(
            &da,
            "SELECT count(*) FROM pgcrew.runs WHERE tenant_id = 'acme'"
        )
        .await,
        0
    );
    let moved = RoutingMap::load(&file).unwrap();
    assert_eq!(moved.shards["b"], vec!["acme".to_string()]);
    assert!(moved.shards["a"].is_empty());

    // A shard the map names with no DSN in the environment.
    let unknown = dir.join("unknown.json");
    map(json!({"shards": {"a": [], "b": ["acme"], "c": ["globex"]}}))
        .save(&unknown)
        .unwrap();
    let (code, out, err) = shard_cli(&["check", "--routes", unknown.to_str().unwrap()], &env).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("shard `c`") && err.contains("PGCREW_SHARD_C"),
        "{err}"
    );

    // A tenant in two shards: the file is refused when loaded.
    let twice = dir.join("twice.json");
    std::fs::write(&twice, r#"{"shards": {"a": ["acme"], "b": ["acme"]}}"#).unwrap();
    let (code, out, err) = shard_cli(&["check", "--routes", twice.to_str().unwrap()], &env).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("tenant `acme` on two shards"), "{err}");

    // A shard that is down: check names it and exits 1; a move from it fails (exit 2) and
    // leaves the file alone.
    cb.stop_server("fast").unwrap();
    let (code, out, err) = shard_cli(&["check", "--routes", routes], &env).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("unreachable: b"), "{out}");
    assert!(out.contains("a: "), "{out}");
    let (code, out, err) = shard_cli(
        &[
            "move", "--routes", routes, "--tenant", "acme", "--from", "b", "--to", "a",
        ],
        &env,
    )
    .await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(
        RoutingMap::load(&file).unwrap().shards["b"],
        vec!["acme".to_string()]
    );
    std::fs::remove_dir_all(&dir).unwrap();
    drop((sa, sb, db, da));
}
