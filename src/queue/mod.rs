//! The durable task queue.
//!
//! Tasks live in `pgcrew.tasks`. They are enqueued singly ([`enqueue`]), in bulk
//! ([`enqueue_many`], thousands per statement) or inside the caller's own transaction (both take
//! any [`Executor`](crate::db::Executor): the pool `&db`, a pooled connection `&conn` or pooled
//! transaction `&tx`, which cache the prepared statement per connection, or a tokio-postgres
//! `Client` or `Transaction`; `Client::enqueue` uses the client's pool),
//! claimed with `FOR UPDATE SKIP LOCKED` by
//! the `pgcrew.claim_tasks` function —
//! fairly across tenants and within every tenant's concurrency limit — and acknowledged in
//! batches with a claim token ([`ack`]). The [`WorkerPool`] service runs handlers registered by
//! kind inside a `Client`; the leader's maintenance rescues tasks of dead
//! instances and deletes old finished tasks ([`maintenance_steps`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use pgcrew::queue::{self, NewTask, TaskOutcome, WorkerPool};
//! use pgcrew::{Client, ClientConfig};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Email { to: String }
//!
//! # async fn demo(dsn: &str) -> pgcrew::Result<()> {
//! let pool = WorkerPool::builder()
//!     .queue("default")
//!     .concurrency(8)
//!     .handler("send_email", |_ctx, email: Email| async move {
//!         println!("sending to {}", email.to);
//!         Ok(TaskOutcome::Complete)
//!     })
//!     .build()?;
//! let client = Client::builder(dsn)
//!     .config(ClientConfig::default())
//!     .service(pool.clone())
//!     .build()
//!     .await?;
//! client.start().await?;
//! client.enqueue(&NewTask::new("send_email", &Email { to: "x@y.z".into() })?).await?;
//! // Or inside your own transaction: the task exists only if it commits.
//! let mut conn = client.db().get().await?;
//! let tx = conn.transaction().await?;
//! queue::enqueue(&tx, &NewTask::new("send_email", &Email { to: "a@b.c".into() })?).await?;
//! tx.commit().await?;
//! # tokio::time::sleep(Duration::from_secs(1)).await;
//! client.stop().await?;
//! # Ok(())
//! # }
//! ```

mod admin;
mod backpressure;
mod claim;
mod enqueue;
mod events;
mod key_limit;
mod maintenance;
mod pause;
mod payload;
mod rate_limit;
mod retry;
mod state;
mod task;
mod worker;

use std::time::Duration;

pub use admin::{
    TaskRow, TaskStats, cancel, clear_queue_limit, discard, get, list, retry, set_queue_limit,
    stats,
};
pub use backpressure::{
    BackpressureMode, clear_backpressure, enqueue_with_backpressure, set_backpressure,
};
pub use claim::{
    Ack, AckOutcome, AckReport, ClaimedTask, HeartbeatReport, ack, claim, heartbeat, next_due,
};
pub use enqueue::{Enqueued, enqueue, enqueue_many};
pub use events::{
    MAX_ACTOR_LEN, QueuePauseEvent, TaskAction, TaskEvent, act_on_task, queue_pause_events,
    set_paused_by, task_events,
};
pub use key_limit::{KeyLimit, clear_key_limit, key_limits, set_key_limit};
pub use maintenance::{
    QueueHistoryRetention, QueueMinutes, RescueTasks, TaskRetention, maintenance_steps,
};
pub use pause::{QueueDepth, pause, queues, resume};
pub use payload::{bound_error_text, payload_size};
pub use rate_limit::{Rate, RateLimit, RateScope, clear_rate_limit, rate_limits, set_rate_limit};
pub use retry::RetryPolicy;
pub use state::{Priority, TaskState};
pub use task::NewTask;
pub use worker::{
    DEFAULT_SATURATION_THRESHOLD, HandlerError, Saturation, TaskContext, TaskOutcome,
    WorkerMetrics, WorkerMetricsSnapshot, WorkerPool, WorkerPoolBuilder,
};

/// Largest accepted task payload, in bytes of its JSON text as PostgreSQL renders the stored
/// `jsonb` (`octet_length(payload::text)`, see [`payload_size`]). Every enqueue path refuses a
/// larger payload with [`Error::InvalidInput`](crate::Error::InvalidInput) (field `payload`) and stores nothing; the SQL
/// function `pgcrew.enqueue_task` refuses it with SQLSTATE `PC021`.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Longest delay a task can be given: 3650 days (about 10 years). A longer enqueue `delay` is
/// refused ([`Error::InvalidInput`](crate::Error::InvalidInput), field `delay`; SQLSTATE `PC022` from
/// `pgcrew.enqueue_task`); longer snoozes and retry backoffs (e.g. `Duration::MAX`) are clamped
/// to it, by the library and by `pgcrew.ack_tasks`.
pub const MAX_TASK_DELAY: Duration = Duration::from_secs(3650 * 24 * 3600);

/// Longest error text stored per attempt (`last_error`, `errors[].error`), in characters. A
/// longer text keeps its beginning and ends with ` … [truncated: N characters in all]`, the
/// whole being exactly this long ([`bound_error_text`]; `pgcrew.ack_tasks` does the same).
pub const MAX_ERROR_CHARS: usize = 8192;

/// Entries kept in a task's `errors` history: the most recent ones (each carries its attempt
/// number, so a gap shows where older ones were dropped).
pub const MAX_ERRORS_KEPT: usize = 100;

/// Most tasks per bulk enqueue ([`enqueue_many`], `pgcrew tasks enqueue --count`): a larger
/// batch is refused with [`Error::InvalidInput`](crate::Error::InvalidInput) (field `tasks`) and nothing is stored; split
/// it into several calls.
pub const MAX_ENQUEUE_BATCH: usize = 100_000;

/// Longest accepted unique key, in bytes.
pub const MAX_UNIQUE_KEY_LEN: usize = 512;

/// The queue tasks go to unless another is named.
pub const DEFAULT_QUEUE: &str = "default";

/// The tenant that owns work naming no tenant.
pub const DEFAULT_TENANT: &str = "default";
