//! Queue promises at the edges (issue #15): poison acknowledgements, limits under multi-queue
//! claims, retries of dependants, unbounded inputs, agent/worker wiring; one file per concern,
//! with the helpers they share here.

mod acks;
mod agents;
mod dependants;
mod inputs;
mod limits;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgcrew::queue::{self, Ack, AckOutcome, NewTask, RetryPolicy, TaskOutcome, TaskState};
use pgcrew::queue::{WorkerPool, WorkerPoolBuilder};
use pgcrew::{Client, ClientConfig, Error};

use crate::common::{
    COMPLETED_TASKS, OPEN_TASKS, RUNNING_TASKS, TestDb, cancel_task, create_tenant,
    db_with_instance, db_with_instance_conn, enqueued, eventually, fast_config, first_column,
    pgcrew_bin, recording_handler, retry_task, scalar, setup_and_enqueue, start_client, task,
    test_db,
};

/// [`fast_config`] with a 2 s task heartbeat timeout, eight connections and leader election
/// on or off.
fn config(id: &str, leader: bool) -> ClientConfig {
    fast_config(id)
        .task_heartbeat_timeout(Duration::from_secs(2))
        .pool_size(8)
        .leader_election(leader)
        .build()
        .unwrap()
}

async fn start(t: &TestDb, id: &str, pool: Arc<WorkerPool>, leader: bool) -> Client {
    start_client(t.dsn(), config(id, leader), Some(pool)).await
}

fn qs(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}
