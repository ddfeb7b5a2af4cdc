//! The one-builder agent service (issue #18, item 1): `Client::builder(..).agent(..).tool(..)
//! .model(..).worker_pool(..)` registers, hosts and drains agents beside the user's own queues;
//! `client.submit` and `client.wait_for_run`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgcrew::agent::demo::{self, SUPPORT_AGENT};
use pgcrew::coord::client::DbSource;
use pgcrew::queue::{TaskOutcome, WorkerPool, WorkerPoolBuilder};
use pgcrew::runs::{self, RunState};
use pgcrew::{Client, Error, NewTask, RunId, ScriptedModel, TenantId};
use serde_json::Value;

use crate::common::{fast_config, scalar, tenant, test_db, wait_until};

/// A client hosting the demo `support` agent (its tools, the offline scripted model) on
/// `source` as instance `id`, with `pool` as its own worker pool; built, not started.
pub async fn agent_service(
    source: impl Into<DbSource>,
    id: &str,
    pool: Option<WorkerPoolBuilder>,
) -> pgcrew::Result<Client> {
    let support = demo::demo_agents(demo::DEMO_MODEL)
        .into_iter()
        .find(|a| a.name == SUPPORT_AGENT)
        .ok_or_else(|| Error::Internal("no support agent".into()))?;
    let mut b = Client::builder(source)
        .config(fast_config(id).build()?)
        .agent(support)
        .model(Arc::new(ScriptedModel::demo_agent()));
    for t in demo::demo_tools(Duration::ZERO)?.iter() {
        b = b.tool(t.clone());
    }
    if let Some(p) = pool {
        b = b.worker_pool(p);
    }
    b.build().await
}

#[tokio::test]
async fn one_builder_hosts_agents_beside_the_users_queues() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", &[], Some(5.0)).await;
    let emails = Arc::new(AtomicUsize::new(0));
    let seen = emails.clone();
    let pool = WorkerPool::builder()
        .queue("emails")
        .concurrency(4)
        .handler("send_email", move |_ctx, _p: Value| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                Ok(TaskOutcome::Complete)
            }
        });
    // From a DSN: no Db to connect first.
    let client = agent_service(t.dsn().to_string(), "svc-1", Some(pool))
        .await
        .unwrap();
    // build() registered the agent and its tools.
    assert_eq!(
        scalar(
            &t.db,
            "SELECT count(*) FROM pgcrew.agents WHERE name = 'support'"
        )
        .await,
        1
    );
    assert_eq!(
        scalar(
            &t.db,
            "SELECT count(*) FROM pgcrew.tools WHERE name IN ('lookup_order', 'get_weather')"
        )
        .await,
        2
    );
    client.start().await.unwrap();
    // The instance is linked to the agent and its tools (said once, on the builder).
    assert_eq!(
        scalar(
            &t.db,
            "SELECT count(*) FROM pgcrew.instance_agents WHERE instance_id = 'svc-1' AND agent_name = 'support'"
        )
        .await,
        1
    );
    let run = client
        .submit(SUPPORT_AGENT, &acme, "user-1", "Where is order A-1001?")
        .await
        .unwrap();
    let done = client
        .wait_for_run(run, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state, RunState::Completed, "{done:?}");
    assert!(done.response_text.is_some_and(|r| !r.is_empty()));
    assert_eq!(done.instance_id.as_deref(), Some("svc-1"));
    // The session was created from its identifier.
    let session = runs::get_session(&t.db, done.session_id.unwrap())
        .await
        .unwrap();
    assert_eq!(session.identifier, "user-1");
    // The user's own queue and handler still work on the same pool.
    let task = NewTask::new("send_email", &serde_json::json!({"to": "a@b"}))
        .unwrap()
        .queue("emails");
    client.enqueue(&task).await.unwrap();
    wait_until(Duration::from_secs(10), "the user's email task ran", || {
        let emails = emails.clone();
        async move { emails.load(Ordering::SeqCst) == 1 }
    })
    .await;
    client.stop().await.unwrap();
    assert_eq!(
        scalar(
            &t.db,
            "SELECT count(*) FROM pgcrew.tasks WHERE state NOT IN ('completed')"
        )
        .await,
        0,
        "stop() drained the pool"
    );
}

#[tokio::test]
async fn without_a_worker_pool_only_the_agents_queues_are_worked() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", &[], None).await;
    let client = agent_service(t.db.clone(), "svc-2", None).await.unwrap();
    client.start().await.unwrap();
    // A task on `default` is not this service's: it stays available.
    let stray = client
        .enqueue(&NewTask::new("not_mine", &serde_json::json!({})).unwrap())
        .await
        .unwrap();
    let run = client
        .submit(SUPPORT_AGENT, &acme, "u", "Weather in Oslo?")
        .await
        .unwrap();
    let done = client
        .wait_for_run(run, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state, RunState::Completed);
    let state = pgcrew::queue::get(&t.db, stray.id).await.unwrap().state;
    assert_eq!(state, pgcrew::queue::TaskState::Available);
    client.stop().await.unwrap();
}

#[tokio::test]
async fn the_builder_refuses_an_agent_without_its_tool_or_a_model() {
    let t = test_db().await;
    let support = demo::demo_agents(demo::DEMO_MODEL).remove(0);
    // No tools added.
    let e = Client::builder(t.db.clone())
        .agent(support.clone())
        .model(Arc::new(ScriptedModel::demo_agent()))
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Config(m) if m.contains("lookup_order")),
        "{e}"
    );
    // No model.
    let mut b = Client::builder(t.db.clone()).agent(support);
    for tool in demo::demo_tools(Duration::ZERO).unwrap().iter() {
        b = b.tool(tool.clone());
    }
    let e = b.build().await.unwrap_err();
    assert!(matches!(&e, Error::Config(m) if m.contains("model")), "{e}");
    // Nothing was registered.
    assert_eq!(scalar(&t.db, "SELECT count(*) FROM pgcrew.agents").await, 0);
}

#[tokio::test]
async fn submit_and_wait_give_typed_errors() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", &[], None).await;
    let client = agent_service(t.db.clone(), "svc-3", None).await.unwrap();
    let e = client.submit("ghost", &acme, "u", "hi").await.unwrap_err();
    assert!(matches!(&e, Error::NotFound { kind: "agent", .. }), "{e}");
    let nobody = TenantId::new("nobody").unwrap();
    let e = client
        .submit(SUPPORT_AGENT, &nobody, "u", "hi")
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::NotFound { kind: "tenant", .. }), "{e}");
    let e = client
        .submit(SUPPORT_AGENT, &acme, "u", "  ")
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::InvalidInput { .. }), "{e}");
    let e = client
        .submit(SUPPORT_AGENT, &acme, "", "hi")
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::InvalidInput { .. }), "{e}");
    assert_eq!(scalar(&t.db, "SELECT count(*) FROM pgcrew.runs").await, 0);
    assert_eq!(
        scalar(&t.db, "SELECT count(*) FROM pgcrew.sessions").await,
        0
    );
    // An unknown run.
    let e = client
        .wait_for_run(RunId::new(), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::NotFound { kind: "run", .. }), "{e}");
    // Not started: the run stays pending, the wait times out.
    let run = client
        .submit(SUPPORT_AGENT, &acme, "u", "hi")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let e = client
        .wait_for_run(run, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn wait_for_run_is_woken_by_the_run_state_notification() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", &[], None).await;
    // A client that hosts nothing but listens.
    let client = Client::builder(t.db.clone())
        .config(fast_config("listener").build().unwrap())
        .build()
        .await
        .unwrap();
    client.start().await.unwrap();
    let host = agent_service(t.db.clone(), "svc-4", None).await.unwrap();
    let run = host.submit(SUPPORT_AGENT, &acme, "u", "hi").await.unwrap();
    // A one-minute fallback poll: only the notification can end the wait in time.
    let waiter = {
        let (db, notifier) = (t.db.clone(), client.notifier().clone());
        tokio::spawn(async move {
            pgcrew::client::wait_for_run(
                &db,
                &notifier,
                run,
                Duration::from_secs(30),
                Duration::from_secs(60),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = tokio::time::Instant::now();
    runs::cancel_run(&t.db, run, "changed my mind")
        .await
        .unwrap();
    let r = waiter.await.unwrap().unwrap();
    assert_eq!(r.state, RunState::Cancelled);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "woken after {:?}",
        started.elapsed()
    );
    client.stop().await.unwrap();
}

#[test]
fn pgcrew_init_generates_the_one_builder_service() {
    let dir =
        std::env::temp_dir().join(format!("pgcrew-init-svc-{}", uuid::Uuid::new_v4().simple()));
    let out = std::process::Command::new(crate::common::pgcrew_bin())
        .arg("init")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let main = std::fs::read_to_string(dir.join("src/main.rs")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    crate::common::assert_contains_all(
        &main,
        &[
            "Client::builder(dsn)",
            ".agent(agent())",
            ".tool(lookup_customer()?)",
            ".model(model()?)",
            ".worker_pool(workers)",
            "client\n        .submit(",
            "client.wait_for_run(",
        ],
    );
    // The pieces the builder now wires are not repeated by hand.
    for gone in [
        "register_agent",
        "register_tools",
        "AgentRuntime",
        "Kernel::new",
        "Db::connect",
    ] {
        assert!(
            !main.contains(gone),
            "the scaffold still wires {gone} by hand"
        );
    }
}

#[tokio::test]
async fn run_lease_ttl_reaches_the_hosted_runs() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", &[], None).await;
    let support = demo::demo_agents(demo::DEMO_MODEL).remove(0);
    // Slow tools, so the run is seen holding its lease.
    let mut b = Client::builder(t.db.clone())
        .config(fast_config("svc-ttl").build().unwrap())
        .agent(support)
        .model(Arc::new(ScriptedModel::demo_agent()))
        .run_lease_ttl(Duration::from_secs(3));
    for tool in demo::demo_tools(Duration::from_millis(1500))
        .unwrap()
        .iter()
    {
        b = b.tool(tool.clone());
    }
    let client = b.build().await.unwrap();
    client.start().await.unwrap();
    let run = client
        .submit(SUPPORT_AGENT, &acme, "u", "Where is order A-1?")
        .await
        .unwrap();
    let sql = format!(
        "SELECT count(*) FROM pgcrew.runs WHERE id = '{run}' AND state = 'running' \
         AND lease_expires_at > now() AND lease_expires_at <= now() + interval '3 seconds'"
    );
    wait_until(
        Duration::from_secs(10),
        "the run leased for at most 3 s",
        || {
            let (db, sql) = (t.db.clone(), sql.clone());
            async move { scalar(&db, &sql).await == 1 }
        },
    )
    .await;
    let done = client
        .wait_for_run(run, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state, RunState::Completed);
    client.stop().await.unwrap();
}
