//! Task queue: enqueue, claim, acks, worker pool, limits, fairness, crash recovery; one file
//! per concern, with the helpers they share here.

mod cli;
mod crash;
mod lifecycle;
mod load;
mod notify;
mod plans;
mod pool;
mod sql;
mod vacuum;

use std::sync::Arc;
use std::time::Duration;

use pgcrew::queue::{self, Ack, AckOutcome, TaskState, WorkerPool};
use pgcrew::{ClaimToken, Client, ClientConfig, TaskId};

use crate::common::{self, TestDb, fast_config};

/// The queue tests' instance configuration: [`fast_config`] with a 2 s task heartbeat timeout
/// and six connections.
fn config(id: &str) -> ClientConfig {
    fast_config(id)
        .task_heartbeat_timeout(Duration::from_secs(2))
        .pool_size(6)
        .build()
        .unwrap()
}

/// A started client with [`config`], the worker pool (if any) and leader election on or off.
async fn start_client(t: &TestDb, id: &str, pool: Option<Arc<WorkerPool>>, leader: bool) -> Client {
    let mut cfg = config(id);
    cfg.leader_election = leader;
    common::start_client(t.dsn(), cfg, pool).await
}

async fn state_of(t: &TestDb, id: TaskId) -> TaskState {
    let conn = t.db.get().await.unwrap();
    queue::get(&conn, id).await.unwrap().state
}

/// Wait until task `id` is in `state`; panics with `what` if it is not within `timeout`.
async fn wait_state(t: &TestDb, id: TaskId, state: TaskState, timeout: Duration, what: &str) {
    common::wait_until(timeout, what, || async { state_of(t, id).await == state }).await
}

/// A connection of its own listening on `pgcrew_task_available` and on `instance`'s wake
/// channel (where single enqueues name its pools), to see every wake-up NOTIFY whatever the
/// pools do: (client, connection driver, notifications).
async fn listen_wake_ups(
    t: &TestDb,
    instance: &pgcrew::InstanceId,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
) {
    let (listener, driver, notes) = pgcrew::Db::connect_dedicated(t.db.config()).await.unwrap();
    let wake = pgcrew::coord::notify::wake_channel(instance);
    listener
        .batch_execute(&format!("LISTEN pgcrew_task_available; LISTEN {wake}"))
        .await
        .unwrap();
    (listener, driver, notes)
}

/// An acknowledgement completing claim `token` of task `id`.
fn completed(id: TaskId, token: ClaimToken) -> Ack {
    Ack {
        id,
        token,
        outcome: AckOutcome::Complete,
    }
}

/// An acknowledgement failing claim `token` of task `id` with `error`, retried after `retry_in`.
fn failed(id: TaskId, token: ClaimToken, error: &str, retry_in: Duration) -> Ack {
    Ack {
        id,
        token,
        outcome: AckOutcome::Fail {
            error: error.into(),
            retry_in,
        },
    }
}

fn q(name: &str) -> Vec<String> {
    vec![name.to_string()]
}
