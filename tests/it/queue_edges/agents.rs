//! Agents and the worker pool's queues.

use super::*;

fn runtime(t: &TestDb) -> pgcrew::agent::AgentRuntime {
    let model = Arc::new(pgcrew::model::ScriptedModel::by_turn(Vec::new()));
    pgcrew::agent::AgentRuntime::new(pgcrew::kernel::Kernel::new(t.db.clone(), model), "edge")
}

#[tokio::test]
async fn installing_agents_keeps_the_pools_queues() {
    let t = test_db().await;
    let base = || -> WorkerPoolBuilder {
        WorkerPool::builder()
            .poll_interval(Duration::from_millis(100))
            .heartbeat_interval(Duration::from_millis(500))
            .handler("plain", |_ctx, _p: serde_json::Value| async move {
                Ok(TaskOutcome::Complete)
            })
    };
    // The implicit default queue survives.
    let pool = runtime(&t).install(base(), &["helper"]).build().unwrap();
    assert_eq!(pool.queues(), ["default", "agent.helper"]);
    // Explicit queues survive, whether named before or after.
    let pool = runtime(&t)
        .install(base().queue("mine"), &["helper"])
        .queue("later")
        .build()
        .unwrap();
    assert_eq!(pool.queues(), ["mine", "agent.helper", "later"]);

    // And the pool works them: 503 plain tasks on the default queue are all processed.
    let pool = runtime(&t).install(base(), &["helper"]).build().unwrap();
    {
        let conn = t.db.get().await.unwrap();
        let tasks = vec![task("plain"); 503];
        queue::enqueue_many(&conn, &tasks).await.unwrap();
    }
    let client = start(&t, "agents", pool, false).await;
    let all = eventually(Duration::from_secs(60), || async {
        scalar(&t, COMPLETED_TASKS).await == 503
    })
    .await;
    client.stop().await.unwrap();
    assert!(all, "default-queue tasks were left unprocessed");
}
