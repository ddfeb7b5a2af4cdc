//! Instances, leader lease, maintenance and notifications.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgcrew::coord::instance;
use pgcrew::coord::leader;
use pgcrew::{Client, ClientConfig, Error, EventKind, InstanceId};

use crate::common::{
    TestDb, connect_error, dsn_parts, fast_config, insert_run, lock_leader_row,
    next_run_state_change, scalar_on, start_client, start_leader, test_db, wait_for, wait_leader,
    wait_listening, wait_until,
};

/// [`fast_config`] with four connections.
fn config(id: &str) -> ClientConfig {
    fast_config(id).pool_size(4).build().unwrap()
}

/// A scratch database and a started client (with [`config`]) for instance `id` on it.
async fn started(id: &str) -> (TestDb, Client) {
    let t = test_db().await;
    let client = start_client(t.db.clone(), config(id), None).await;
    (t, client)
}

#[tokio::test]
async fn migrate_is_idempotent_and_schema_is_checked() {
    let t = test_db().await;
    let report = t.db.migrate().await.unwrap();
    assert!(report.applied.is_empty());
    assert_eq!(report.to_version, pgcrew::db::latest_version());
    assert_eq!(
        t.db.check_schema().await.unwrap(),
        pgcrew::db::latest_version()
    );
}

#[tokio::test]
async fn start_registers_elects_and_stop_deregisters() {
    let t = test_db().await;
    let became = Arc::new(AtomicUsize::new(0));
    let b = became.clone();
    let client = Client::builder(t.db.clone())
        .config(config("solo"))
        .on_became_leader(move |_| {
            b.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .await
        .unwrap();
    client.start().await.unwrap();
    assert!(client.is_running());
    wait_leader(&client, Duration::from_secs(5)).await;
    assert_eq!(became.load(Ordering::SeqCst), 1);
    let rows = instance::list(&t.db).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id, "solo");
    assert!(rows[0].is_leader);
    client.stop().await.unwrap();
    assert!(!client.is_running());
    assert!(!client.is_leader());
    assert!(instance::list(&t.db).await.unwrap().is_empty());
    assert!(leader::current(&t.db).await.unwrap().is_empty());
}

#[tokio::test]
async fn client_without_schema_gets_clear_error() {
    let scratch = pgcrew::db::ScratchDatabase::for_tests().await.unwrap();
    let err = Client::connect(scratch.dsn(), ClientConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SchemaMissing), "{err}");
    assert!(err.to_string().contains("pgcrew migrate"));
}

#[tokio::test]
async fn subscribers_receive_run_state_changes() {
    let (t, client) = started("listener").await;
    let mut subs: Vec<_> = (0..50)
        .map(|_| client.subscribe(&[EventKind::RunStateChanged]))
        .collect();
    let run_id = insert_run(&t.db).await;
    for s in subs.iter_mut() {
        let r = next_run_state_change(s, Duration::from_secs(5), "run state change in time").await;
        assert_eq!(r.0, run_id);
    }
    client.stop().await.unwrap();
}

#[tokio::test]
async fn thousand_subscribers_and_listen_reconnect_with_resync() {
    let (t, client) = started("fanout").await;
    wait_listening(&client, Duration::from_secs(5)).await;
    let conn = t.db.get().await.unwrap();

    // 1,000 subscribers in one process all receive each run-state change.
    let mut subs: Vec<_> = (0..1000)
        .map(|_| client.subscribe(&[EventKind::RunStateChanged]))
        .collect();
    let run_id = insert_run(&t.db).await;
    conn.execute(
        "UPDATE pgcrew.runs SET state = 'running' WHERE id = $1",
        &[&run_id],
    )
    .await
    .unwrap();
    for s in subs.iter_mut() {
        // Creation and the change to running: two notifications naming the run (and nothing
        // else: payloads carry opaque ids only).
        for _ in 0..2 {
            let r = next_run_state_change(s, Duration::from_secs(5), "event in time").await;
            assert_eq!(r.0, run_id);
        }
    }
    drop(subs);

    // Kill the LISTEN connection from the server side: the notifier reconnects, emits Resync,
    // and later events arrive. (It is also the coordination connection, named after the pool's
    // application_name plus ` coordination`; its last statement may be a heartbeat.)
    let mut sub = client.subscribe(&[EventKind::RunStateChanged]);
    let killed = conn
        .query_one(
            "SELECT count(pg_terminate_backend(pid))::int8 FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'pgcrew coordination' \
             AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(killed, 1, "exactly one LISTEN connection per instance");
    let ev = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("resync in time")
        .unwrap();
    assert_eq!(ev, pgcrew::Event::Resync);
    assert!(client.notifier().reconnects() >= 1);
    wait_listening(&client, Duration::from_secs(5)).await;
    conn.execute(
        "UPDATE pgcrew.runs SET state = 'completed' WHERE id = $1",
        &[&run_id],
    )
    .await
    .unwrap();
    let r = next_run_state_change(&mut sub, Duration::from_secs(5), "event after reconnect").await;
    assert_eq!(r.0, run_id);
    client.stop().await.unwrap();
}

#[tokio::test]
async fn callback_subscription_unsubscribes_on_drop() {
    // Not electing: a leader's scheduler subscribes for its term (to `pgcrew_schedules_changed`),
    // which would change the count below whenever this client became leader.
    let t = test_db().await;
    let client = start_client(
        t.db.clone(),
        fast_config("callbacks")
            .pool_size(4)
            .leader_election(false)
            .build()
            .unwrap(),
        None,
    )
    .await;
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let before = client.notifier().subscriber_count();
    let handle = client
        .notifier()
        .on(&[EventKind::InstanceRegistered], move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        });
    let other = start_client(t.db.clone(), config("other"), None).await;
    wait_until(
        Duration::from_secs(5),
        "the other instance delivered the event",
        || async { count.load(Ordering::SeqCst) >= 1 },
    )
    .await;
    drop(handle);
    wait_until(
        Duration::from_secs(2),
        "the dropped subscription is removed",
        || async { client.notifier().subscriber_count() == before },
    )
    .await;
    other.stop().await.unwrap();
    client.stop().await.unwrap();
}

#[tokio::test]
async fn exactly_one_leader_while_instances_stop_and_start() {
    let t = test_db().await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let c = start_client(t.db.clone(), config(&format!("node-{i}")), None).await;
        clients.push(c);
    }
    let mut last_term = 0i64;
    let mut terms_seen = Vec::new();
    // Stop and restart each instance in turn while sampling continuously.
    for round in 0..6 {
        let victim = round % 3;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        let mut saw_leader = false;
        while tokio::time::Instant::now() < deadline {
            let leaders: Vec<i64> = clients.iter().filter_map(|c| c.leader_term()).collect();
            assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
            if let Some(&term) = leaders.first() {
                saw_leader = true;
                assert!(
                    term >= last_term,
                    "term went backwards: {term} < {last_term}"
                );
                if term > last_term {
                    terms_seen.push(term);
                    last_term = term;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(saw_leader, "no leader in round {round}");
        clients[victim].stop().await.unwrap();
        let c = start_client(t.db.clone(), config(&format!("node-{victim}")), None).await;
        clients[victim] = c;
    }
    assert!(terms_seen.windows(2).all(|w| w[0] < w[1]));
    assert!(
        terms_seen.len() >= 2,
        "leadership should have moved: {terms_seen:?}"
    );
    for c in &clients {
        c.stop().await.unwrap();
    }
}

#[tokio::test]
async fn leader_that_cannot_renew_steps_down_before_lease_expires() {
    let t = test_db().await;
    let lost = Arc::new(AtomicUsize::new(0));
    let l = lost.clone();
    let client = Client::builder(t.db.clone())
        .config(config("blocked"))
        .on_lost_leadership(move || {
            l.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .await
        .unwrap();
    start_leader(&client, Duration::from_secs(5)).await;
    // Hold the leader row locked so every renewal blocks.
    let mut conn = t.db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    lock_leader_row(&tx, "FOR UPDATE").await;
    wait_until(Duration::from_secs(3), "client steps down", || async {
        !client.is_leader()
    })
    .await;
    // It stepped down while its lease is still valid in the database: nobody else could have
    // been elected yet.
    let still_valid: bool = tx
        .query_one(
            "SELECT expires_at > now() FROM pgcrew.leader WHERE name = 'default'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        still_valid,
        "leader must stop acting before its lease expires"
    );
    assert_eq!(lost.load(Ordering::SeqCst), 1);
    tx.rollback().await.unwrap();
    // Once renewals go through again it is re-elected with a new term.
    wait_leader(&client, Duration::from_secs(5)).await;
    client.stop().await.unwrap();
}

#[tokio::test]
async fn maintenance_removes_stale_instances_and_fails_stuck_runs() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    conn.execute(
        "INSERT INTO pgcrew.instances (id, hostname, pid, version, last_heartbeat_at) \
         VALUES ('ghost', 'h', 1, 'x', now() - interval '1 hour')",
        &[],
    )
    .await
    .unwrap();
    conn.execute(
        "INSERT INTO pgcrew.instance_tools (instance_id, tool_name) VALUES ('ghost', 't')",
        &[],
    )
    .await
    .unwrap();
    let stuck = uuid::Uuid::new_v4();
    let fresh = uuid::Uuid::new_v4();
    conn.execute(
        "INSERT INTO pgcrew.runs (id, tenant_id) VALUES ($1, 'default'), ($2, 'default')",
        &[&stuck, &fresh],
    )
    .await
    .unwrap();
    conn.execute(
        "UPDATE pgcrew.runs SET state = 'running', started_at = now() - interval '2 hours' WHERE id = $1",
        &[&stuck],
    )
    .await
    .unwrap();
    conn.execute(
        "UPDATE pgcrew.runs SET state = 'running', started_at = now() WHERE id = $1",
        &[&fresh],
    )
    .await
    .unwrap();
    let client = start_client(t.db.clone(), config("janitor"), None).await;
    wait_for(
        &t.db,
        "SELECT count(*) FROM pgcrew.instances WHERE id = 'ghost'",
    )
    .within(Duration::from_secs(5))
    .until(|n| n == 0, "the stale instance is removed")
    .await;
    let links = scalar_on(
        &conn,
        "SELECT count(*) FROM pgcrew.instance_tools WHERE instance_id = 'ghost'",
    )
    .await;
    assert_eq!(links, 0, "links cascade");
    wait_until(
        Duration::from_secs(5),
        "maintenance fails the stuck run with \"run timed out\"",
        || async {
            let r = conn
                .query_one(
                    "SELECT state, error_message FROM pgcrew.runs WHERE id = $1",
                    &[&stuck],
                )
                .await
                .unwrap();
            r.get::<_, String>(0) == "failed"
                && r.get::<_, Option<String>>(1).as_deref() == Some("run timed out")
        },
    )
    .await;
    // The transition is recorded in the run's ledger, and the chain verifies.
    let recorded: i64 = conn
        .query_one(
            "SELECT count(*) FROM pgcrew.events WHERE run_id = $1 AND event_type = 'run_failed'",
            &[&stuck],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 1);
    let verified = pgcrew::runs::verify_run_chain(&t.db, pgcrew::RunId(stuck))
        .await
        .unwrap();
    assert!(verified.valid, "{verified:?}");
    let fresh_state: String = conn
        .query_one("SELECT state FROM pgcrew.runs WHERE id = $1", &[&fresh])
        .await
        .unwrap()
        .get(0);
    assert_eq!(fresh_state, "running");
    // The live instance itself is never removed.
    assert_eq!(instance::list(&t.db).await.unwrap().len(), 1);
    client.stop().await.unwrap();
}

#[tokio::test]
async fn bad_connection_input_gets_clear_errors() {
    // Malformed DSN.
    let err = connect_error("postgres://%%%", 2).await;
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("DSN"), "{err}");
    // Unreachable server.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = connect_error(&format!("postgres://postgres@127.0.0.1:{port}/postgres"), 2).await;
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("is PostgreSQL running"), "{err}");
    // Unknown database, and (on the throwaway cluster, which enforces passwords over TCP)
    // a wrong password.
    let t = test_db().await;
    let (host, port, user, password) = dsn_parts(t.dsn());
    let password = password.map(|p| format!(":{p}")).unwrap_or_default();
    let err = connect_error(
        &format!("postgres://{user}{password}@{host}:{port}/pgcrew_no_such_db"),
        2,
    )
    .await;
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    if pgcrew::db::dsn_from_env().is_none() {
        let err = connect_error(
            &format!("postgres://postgres:wrong@{host}:{port}/postgres"),
            2,
        )
        .await;
        assert!(matches!(err, Error::Authentication { .. }), "{err}");
        assert!(err.to_string().contains("password"), "{err}");
    }
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let t = test_db().await;
    let conn = t.db.get().await.unwrap();
    conn.execute(
        "INSERT INTO pgcrew.refinery_schema_history (version, name, applied_on, checksum) \
         VALUES (999, 'from_the_future', '2030-01-01T00:00:00Z', '0')",
        &[],
    )
    .await
    .unwrap();
    let err = t.db.check_schema().await.unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { database: 999, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade pgcrew"), "{err}");
    let err = t.db.migrate().await.unwrap_err();
    assert!(matches!(err, Error::SchemaTooNew { .. }), "{err}");
    let err = Client::connect(t.db.clone(), ClientConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SchemaTooNew { .. }), "{err}");
}

#[tokio::test]
async fn poll_only_mode_has_no_listen_connection_and_ticks_resync() {
    let t = test_db().await;
    let config = ClientConfig::builder()
        .instance_id(InstanceId::new("poller").unwrap())
        .poll_only(true)
        .notify_poll_interval(Duration::from_millis(200))
        .leader_election(false)
        .build()
        .unwrap();
    let client = Client::connect(t.db.clone(), config).await.unwrap();
    client.start().await.unwrap();
    let mut sub = client.subscribe(&[EventKind::RunStateChanged]);
    let ev = tokio::time::timeout(Duration::from_secs(3), sub.recv())
        .await
        .expect("a resync tick")
        .unwrap();
    assert_eq!(ev, pgcrew::Event::Resync);
    let conn = t.db.get().await.unwrap();
    let listeners = scalar_on(&conn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'").await;
    assert_eq!(listeners, 0);
    assert!(!client.is_leader());
    client.stop().await.unwrap();
}

#[tokio::test]
async fn renewals_and_failed_attempts_do_not_consume_terms() {
    let t = test_db().await;
    let a = start_client(t.db.clone(), config("term-a"), None).await;
    wait_leader(&a, Duration::from_secs(5)).await;
    let first = a.leader_term().unwrap();
    let b = start_client(t.db.clone(), config("term-b"), None).await;
    // Several renewal periods (TTL/3) pass with a follower trying: the term stays.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(a.leader_term(), Some(first));
    assert!(!b.is_leader());
    a.stop().await.unwrap();
    wait_leader(&b, Duration::from_secs(2)).await;
    assert_eq!(
        b.leader_term(),
        Some(first + 1),
        "the next holder gets the next term"
    );
    b.stop().await.unwrap();
}

#[tokio::test]
async fn exhausted_pool_fails_after_the_wait_timeout_with_a_clear_error() {
    let t = test_db().await;
    let db = pgcrew::Db::connect_with(
        t.dsn(),
        pgcrew::db::PoolOptions {
            size: 1,
            connect_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let held = db.get().await.unwrap();
    let err = db.get().await.unwrap_err();
    assert!(matches!(err, Error::Pool(_)), "{err}");
    assert!(err.to_string().contains("pool_size"), "{err}");
    drop(held);
    assert!(db.get().await.is_ok());
}

/// The notifier's subscriptions filter without a database: by kind (an empty list takes all),
/// by run, `Resync` always passes, and a subscriber that fell more than the buffer behind gets
/// `Resync` in place of what it missed, then the newer events.
#[tokio::test]
async fn subscriptions_filter_by_kind_and_run_and_resync_when_behind() {
    use futures_util::StreamExt;
    use pgcrew::RunId;
    use pgcrew::coord::notify::{Event, Notifier};

    let hub = Notifier::new(16);
    let (mine, other) = (RunId::new(), RunId::new());
    let mut events = hub.subscribe(&[EventKind::RunEvent]);
    let mut run = hub.subscribe_run(mine);
    let mut all = hub.subscribe(&[]);
    let sent = [
        Event::TaskAvailable {
            queue: "q".into(),
            pool: None,
            backup: None,
        },
        Event::RunEvent {
            run_id: other,
            seq: 1,
        },
        Event::RunStateChanged { run_id: mine },
        Event::Resync,
        Event::RunEvent {
            run_id: mine,
            seq: 2,
        },
    ];
    for ev in &sent {
        hub.publish(ev.clone());
    }
    let next = async |s: &mut pgcrew::coord::notify::Subscription| {
        tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap()
            .unwrap()
    };
    for ev in &sent {
        assert_eq!(&next(&mut all).await, ev);
    }
    for ev in [&sent[1], &sent[3], &sent[4]] {
        assert_eq!(&next(&mut events).await, ev);
    }
    for ev in [&sent[2], &sent[3], &sent[4]] {
        assert_eq!(&next(&mut run).await, ev);
    }
    // 40 events into a buffer of 16: the lagging subscriber resyncs, then reads the newest.
    for seq in 0..40 {
        hub.publish(Event::RunEvent { run_id: mine, seq });
    }
    assert_eq!(next(&mut run).await, Event::Resync);
    assert_eq!(
        next(&mut run).await,
        Event::RunEvent {
            run_id: mine,
            seq: 24
        }
    );
    drop(hub);
}

/// Statements `db`'s database has run since the last `pg_stat_statements_reset()` (the reset
/// and these reads left out).
async fn statements_since_reset(db: &pgcrew::Db) -> i64 {
    crate::common::scalar(
        db,
        "SELECT coalesce(sum(s.calls), 0)::bigint FROM pg_stat_statements s \
           JOIN pg_database d ON d.oid = s.dbid \
          WHERE d.datname = current_database() AND s.query NOT LIKE '%pg_stat_statements%'",
    )
    .await
}

/// Issue #22: a maintenance pass with nothing to do is one statement (`pgcrew.maintenance_due`,
/// V041); it was 13 fenced transactions of 4 statements (52). A step with work still runs in
/// its own fenced transaction, and a deposed leader's pass runs no step. Counted with
/// `pg_stat_statements` on a throwaway cluster (`PGCREW_TEST_CLUSTER_PORT` fixes its port).
#[tokio::test]
async fn a_maintenance_pass_with_nothing_to_do_is_one_statement() {
    let (_cluster, _scratch, db) = crate::common::statements_db("maint_idle").await;
    let id = InstanceId::new("janitor").unwrap();
    let leader::Election::Leader { term } =
        leader::elect(&db, leader::DEFAULT_LEASE, &id, Duration::from_secs(60))
            .await
            .unwrap()
    else {
        panic!("no leader on a fresh database");
    };
    let ctx = pgcrew::coord::maintenance::MaintenanceContext {
        config: Arc::new(ClientConfig::default()),
        instance_id: id.clone(),
        lease: leader::DEFAULT_LEASE.into(),
        term,
    };
    let steps = pgcrew::client::default_maintenance_steps();
    let run = pgcrew::coord::maintenance::run_once;

    crate::common::reset_statements(&db).await;
    let report = run(&db, &steps, &ctx).await.unwrap();
    let idle = statements_since_reset(&db).await;
    assert_eq!(report.skipped.len(), steps.len(), "{report:?}");
    assert!(idle <= 2, "an idle maintenance pass ran {idle} statements");

    // A stale instance: its step runs (fenced: BEGIN, fence, delete, COMMIT), the others not.
    add_stale_instance(&db).await;
    crate::common::reset_statements(&db).await;
    let report = run(&db, &steps, &ctx).await.unwrap();
    assert_eq!(report.count("stale_instances"), 1, "{report:?}");
    assert!(!report.skipped.iter().any(|s| s == "stale_instances"));
    let busy = statements_since_reset(&db).await;
    assert!(
        busy <= 6,
        "a pass with one step to do ran {busy} statements"
    );

    // A deposed leader: the pass stops at its first statement and runs no step.
    add_stale_instance(&db).await;
    let deposed = pgcrew::coord::maintenance::MaintenanceContext {
        term: term + 1,
        ..ctx.clone()
    };
    let err = run(&db, &steps, &deposed).await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost(_)), "{err:?}");
    let ghosts = crate::common::scalar(
        &db,
        "SELECT count(*) FROM pgcrew.instances WHERE id = 'ghost'",
    )
    .await;
    assert_eq!(ghosts, 1, "a deposed leader removed an instance");
}

/// Issue #23 (`bench queue --retained`): an idle maintenance pass reads no more of
/// `pgcrew.tasks` than a few index pages, however many finished tasks it keeps. Its check for
/// the console's per-minute figures was an EXISTS whose bound the planner could not see: it
/// scanned the whole table on every pass when nothing had finished since the newest minute.
#[tokio::test]
async fn an_idle_maintenance_pass_does_not_read_the_tasks_table() {
    let t = test_db().await;
    let id = InstanceId::new("janitor").unwrap();
    let leader::Election::Leader { term } =
        leader::elect(&t.db, leader::DEFAULT_LEASE, &id, Duration::from_secs(60))
            .await
            .unwrap()
    else {
        panic!("no leader on a fresh database");
    };
    let ctx = pgcrew::coord::maintenance::MaintenanceContext {
        config: Arc::new(ClientConfig::default()),
        instance_id: id.clone(),
        lease: leader::DEFAULT_LEASE.into(),
        term,
    };
    let steps = pgcrew::client::default_maintenance_steps();
    let c = t.db.get().await.unwrap();
    // 50,000 tasks finished two hours ago (kept: retention is a day; older than the figures'
    // hour), and the figures written up to now.
    c.batch_execute(
        "INSERT INTO pgcrew.tasks (queue, kind, state, attempts, claimed_at, finalized_at)
         SELECT 'q', 'k', 'completed', 1, now() - interval '2 hours',
                now() - interval '2 hours' + g * interval '1 ms'
           FROM generate_series(1, 50000) g;
         INSERT INTO pgcrew.queue_minutes
                (minute, queue, completed, discarded, cancelled, timed, wait_ms, run_ms)
         VALUES (date_trunc('minute', now()), 'q', 0, 0, 0, 0, 0, 0);
         ANALYZE pgcrew.tasks",
    )
    .await
    .unwrap();
    let read = async || {
        c.batch_execute("SELECT pg_stat_force_next_flush(); SELECT pg_stat_clear_snapshot()")
            .await
            .unwrap();
        scalar_on(
            &c,
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
               FROM pg_stat_user_tables WHERE relid = 'pgcrew.tasks'::regclass",
        )
        .await
    };
    // The pass itself, to see it has nothing to do here.
    let report = pgcrew::coord::maintenance::run_once(&t.db, &steps, &ctx)
        .await
        .unwrap();
    assert_eq!(report.skipped.len(), steps.len(), "{report:?}");
    // Its check, on this connection (whose statistics are flushed on demand), as the pass
    // calls it: the default ages in microseconds.
    let before = read().await;
    for _ in 0..3 {
        let due: Option<Vec<String>> = c
            .query_one(
                "SELECT pgcrew.maintenance_due($1, $2, $3, 120000000, 120000000, 86400000000,
                                               2592000000000, 3600000000)",
                &[&leader::DEFAULT_LEASE, &id.as_str(), &term],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(due, Some(vec![]), "nothing is due");
    }
    let rows = read().await - before;
    assert!(
        rows < 1000,
        "three maintenance checks read {rows} rows of pgcrew.tasks (50,000 finished tasks)"
    );
}

/// A registered instance `ghost` whose last heartbeat was an hour ago.
async fn add_stale_instance(db: &pgcrew::Db) {
    db.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO pgcrew.instances (id, hostname, pid, version, last_heartbeat_at) \
             VALUES ('ghost', 'h', 1, 'x', now() - interval '1 hour')",
            &[],
        )
        .await
        .unwrap();
}

/// A failing maintenance step does not keep the steps after it from running; the pass still
/// ends with its error.
#[tokio::test]
async fn a_failing_maintenance_step_does_not_block_the_others() {
    struct Failing;
    #[async_trait::async_trait]
    impl pgcrew::coord::maintenance::MaintenanceStep for Failing {
        fn name(&self) -> &'static str {
            "failing"
        }
        async fn run(
            &self,
            tx: &tokio_postgres::Transaction<'_>,
            _ctx: &pgcrew::coord::maintenance::MaintenanceContext,
        ) -> pgcrew::Result<u64> {
            tx.batch_execute("SELECT 1/0").await?;
            Ok(0)
        }
    }
    let t = test_db().await;
    let id = InstanceId::new("janitor").unwrap();
    let leader::Election::Leader { term } =
        leader::elect(&t.db, leader::DEFAULT_LEASE, &id, Duration::from_secs(60))
            .await
            .unwrap()
    else {
        panic!("no leader on a fresh database");
    };
    t.db.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO pgcrew.instances (id, hostname, pid, version, last_heartbeat_at) \
             VALUES ('ghost', 'h', 1, 'x', now() - interval '1 hour')",
            &[],
        )
        .await
        .unwrap();
    let ctx = pgcrew::coord::maintenance::MaintenanceContext {
        config: Arc::new(ClientConfig::default()),
        instance_id: id,
        lease: leader::DEFAULT_LEASE.into(),
        term,
    };
    let steps: Vec<Arc<dyn pgcrew::coord::maintenance::MaintenanceStep>> = vec![
        Arc::new(Failing),
        Arc::new(pgcrew::coord::maintenance::StaleInstances),
    ];
    let err = pgcrew::coord::maintenance::run_once(&t.db, &steps, &ctx)
        .await
        .unwrap_err();
    assert!(!matches!(err, Error::LeaseLost(_)), "{err:?}");
    let ghosts = scalar_on(
        &t.db.get().await.unwrap(),
        "SELECT count(*) FROM pgcrew.instances WHERE id = 'ghost'",
    )
    .await;
    assert_eq!(ghosts, 0, "the step after the failing one did not run");
}
