//! `pgcrew tasks stats|list|cancel|retry|discard|enqueue` (and the hidden `work`, a worker process used
//! by process-level tests and demos).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use pgcrew::db::{Executor, sql_type_of};
use pgcrew::queue::{self, NewTask, Priority, TaskOutcome, TaskState, WorkerPool};
use pgcrew::{Client, ClientConfig, Error, InstanceId, Result, TaskId, TenantId};

use crate::output::{JsonFlag, connect, duration_arg, print_json, print_rows, require_dsn};

/// Records one execution of a task (used by `pgcrew tasks work --record-effects`).
const RECORD_EFFECT: &str = pgcrew::sql!("queue/record_effect");

/// `--count`: 1 ..= [`queue::MAX_ENQUEUE_BATCH`] (refused by the argument parser: exit 2,
/// nothing stored).
fn count_arg(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number"))?;
    if n == 0 || n > queue::MAX_ENQUEUE_BATCH {
        return Err(format!(
            "{n} is out of range: enqueue 1 to {} tasks per command (run it several times for more)",
            queue::MAX_ENQUEUE_BATCH
        ));
    }
    Ok(n)
}

/// `pgcrew tasks` subcommands.
#[derive(Debug, Subcommand)]
pub enum TasksCmd {
    /// Task counts per queue and state, with the age of the oldest available task.
    Stats(JsonFlag),
    /// List the newest tasks.
    List(ListArgs),
    /// Cancel a task (a running task is cancelled at its worker's next heartbeat).
    Cancel(IdArgs),
    /// Make a task available again now.
    Retry(IdArgs),
    /// Discard a task that is not running and not finished (available, scheduled, retryable);
    /// its dependants not yet started are cancelled.
    Discard(DiscardArgs),
    /// Enqueue one task.
    Enqueue(EnqueueArgs),
    /// Run a worker pool until SIGINT/SIGTERM (testing aid: handlers record executions).
    #[command(hide = true)]
    Work(WorkArgs),
}

/// Flags of `pgcrew tasks list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only tasks in this state.
    #[arg(long)]
    pub state: Option<String>,
    /// Only tasks of this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only tasks of this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// At most this many (newest first).
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A task id argument.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// The task id.
    pub id: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `pgcrew tasks discard`.
#[derive(Debug, Args)]
pub struct DiscardArgs {
    /// The task id.
    pub id: String,
    /// The reason recorded as the task's last error.
    #[arg(long, default_value = "discarded with pgcrew tasks discard")]
    pub reason: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `pgcrew tasks enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Kind (selects the handler).
    #[arg(long)]
    pub kind: String,
    /// JSON payload.
    #[arg(long, default_value = "{}")]
    pub payload: String,
    /// Queue.
    #[arg(long, default_value = "default")]
    pub queue: String,
    /// Tenant.
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Priority: critical, high, normal, low, batch.
    #[arg(long, default_value = "normal")]
    pub priority: String,
    /// Delay (e.g. 30s).
    #[arg(long, value_parser = duration_arg)]
    pub delay: Option<Duration>,
    /// Maximum attempts.
    #[arg(long, default_value_t = 25)]
    pub max_attempts: i32,
    /// Unique key.
    #[arg(long)]
    pub unique_key: Option<String>,
    /// Dependencies (task ids, comma separated).
    #[arg(long, value_delimiter = ',')]
    pub depends_on: Vec<String>,
    /// Enqueue this many copies (bulk, one statement; 1 to 100000, the library's
    /// `queue::MAX_ENQUEUE_BATCH`).
    #[arg(long, default_value_t = 1, value_parser = count_arg)]
    pub count: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Flags of the hidden `pgcrew tasks work`.
#[derive(Debug, Args)]
pub struct WorkArgs {
    /// Instance id.
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Queues to work.
    #[arg(long, default_value = "default")]
    pub queue: Vec<String>,
    /// Kinds handled (each records an execution when --record-effects is set).
    #[arg(long, default_value = "effect")]
    pub kind: Vec<String>,
    /// Handler concurrency.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Prefetch.
    #[arg(long, default_value_t = 0)]
    pub prefetch: usize,
    /// How long each handler sleeps.
    #[arg(long, value_parser = duration_arg, default_value = "5ms")]
    pub task_time: Duration,
    /// Task heartbeat interval.
    #[arg(long, value_parser = duration_arg, default_value = "1s")]
    pub heartbeat_interval: Duration,
    /// Insert (task_id, instance_id) into table `pgcrew_task_effects` for every execution.
    #[arg(long)]
    pub record_effects: bool,
}

/// Execute a `pgcrew tasks` subcommand.
pub async fn exec(dsn: Option<String>, cmd: TasksCmd) -> Result<ExitCode> {
    match cmd {
        TasksCmd::Stats(f) => stats(dsn, f.json).await,
        TasksCmd::List(a) => list(dsn, a).await,
        TasksCmd::Cancel(a) => change_state(dsn, a, true).await,
        TasksCmd::Retry(a) => change_state(dsn, a, false).await,
        TasksCmd::Discard(a) => discard(dsn, a).await,
        TasksCmd::Enqueue(a) => enqueue(dsn, a).await,
        TasksCmd::Work(a) => work(dsn, a).await,
    }
}

async fn stats(dsn: Option<String>, json: bool) -> Result<ExitCode> {
    let db = connect(dsn).await?;
    let conn = db.get().await?;
    let rows = queue::stats(&conn).await?;
    let headers = ["QUEUE", "STATE", "TASKS", "OLDEST AVAILABLE"];
    print_rows(json, &rows, Some("no tasks"), &headers, |r| {
        vec![
            r.queue.clone(),
            r.state.to_string(),
            r.tasks.to_string(),
            r.oldest_available_age_s
                .map(|s| format!("{s:.3}s"))
                .unwrap_or_default(),
        ]
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn list(dsn: Option<String>, a: ListArgs) -> Result<ExitCode> {
    let state = a
        .state
        .as_deref()
        .map(str::parse::<TaskState>)
        .transpose()?;
    let tenant = a.tenant.map(TenantId::new).transpose()?;
    let db = connect(dsn).await?;
    let conn = db.get().await?;
    let rows = queue::list(&conn, state, a.queue.as_deref(), tenant.as_ref(), a.limit).await?;
    let headers = [
        "ID",
        "QUEUE",
        "KIND",
        "TENANT",
        "STATE",
        "ATTEMPTS",
        "RUN AT",
        "LAST ERROR",
    ];
    print_rows(a.json, &rows, Some("no tasks"), &headers, |r| {
        vec![
            r.id.to_string(),
            r.queue.clone(),
            r.kind.clone(),
            r.tenant_id.to_string(),
            r.state.to_string(),
            format!("{}/{}", r.attempts, r.max_attempts),
            r.run_at.to_rfc3339(),
            r.last_error.clone().unwrap_or_default(),
        ]
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `pgcrew tasks cancel` (with `cancel`) or `pgcrew tasks retry`: change the task's state and print
/// the state it is in afterwards.
async fn change_state(dsn: Option<String>, a: IdArgs, cancel: bool) -> Result<ExitCode> {
    let id: TaskId = a.id.parse()?;
    let db = connect(dsn).await?;
    let conn = db.get().await?;
    let state = if cancel {
        queue::cancel(&conn, id).await?
    } else {
        queue::retry(&conn, id).await?
    };
    if cancel && !a.json && state == TaskState::Running {
        println!(
            "task {id} is running: cancellation requested (its worker cancels it at the next heartbeat)"
        );
        return Ok(ExitCode::SUCCESS);
    }
    print_task_state(a.json, id, state)
}

/// `pgcrew tasks discard`: discard the task (refused for a running or finished task) and print
/// its state afterwards.
async fn discard(dsn: Option<String>, a: DiscardArgs) -> Result<ExitCode> {
    let id: TaskId = a.id.parse()?;
    let db = connect(dsn).await?;
    let conn = db.get().await?;
    let state = queue::discard(&conn, id, &a.reason).await?;
    print_task_state(a.json, id, state)
}

/// `{"id", "state"}` with `--json`, else `task <id> <state>`.
fn print_task_state(json: bool, id: TaskId, state: TaskState) -> Result<ExitCode> {
    if json {
        print_json(&serde_json::json!({ "id": id, "state": state }))?;
    } else {
        println!("task {id} {state}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn enqueue(dsn: Option<String>, a: EnqueueArgs) -> Result<ExitCode> {
    let payload: serde_json::Value = serde_json::from_str(&a.payload).map_err(|e| {
        Error::invalid(
            "payload",
            format!("is not valid JSON ({e}); e.g. '{{\"a\": 1}}'"),
        )
    })?;
    let mut task = NewTask::new(a.kind, &payload)?
        .queue(a.queue)
        .tenant(TenantId::new(a.tenant)?)
        .priority(a.priority.parse::<Priority>()?)
        .max_attempts(a.max_attempts);
    if let Some(d) = a.delay {
        task = task.delay(d);
    }
    if let Some(k) = a.unique_key {
        task = task.unique_key(k);
    }
    let deps = a
        .depends_on
        .iter()
        .map(|s| s.parse::<TaskId>())
        .collect::<Result<Vec<_>>>()?;
    task = task.depends_on(deps);
    let db = connect(dsn).await?;
    let conn = db.get().await?;
    if a.count == 1 {
        let r = queue::enqueue(&conn, &task).await?;
        if a.json {
            print_json(&r)?;
        } else if r.duplicate {
            println!(
                "task {} already exists ({}) with that unique key",
                r.id, r.state
            );
        } else {
            println!("task {} {}", r.id, r.state);
        }
    } else {
        let tasks = vec![task; a.count];
        let ids = queue::enqueue_many(&conn, &tasks).await?;
        if a.json {
            print_json(&ids)?;
        } else {
            println!("enqueued {} tasks", ids.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn work(dsn: Option<String>, a: WorkArgs) -> Result<ExitCode> {
    let dsn = require_dsn(dsn)?;
    let mut b = WorkerPool::builder()
        .concurrency(a.concurrency)
        .prefetch(a.prefetch)
        .heartbeat_interval(a.heartbeat_interval)
        .poll_interval(Duration::from_millis(200));
    for q in &a.queue {
        b = b.queue(q.clone());
    }
    let record = a.record_effects;
    let sleep = a.task_time;
    for k in &a.kind {
        b = b.handler(k.clone(), move |ctx, _p: serde_json::Value| async move {
            if record {
                let conn = ctx.client.db().get().await?;
                conn.execute(
                    RECORD_EFFECT,
                    &[
                        (&ctx.id, sql_type_of(&ctx.id)),
                        (
                            ctx.client.instance_id(),
                            sql_type_of(ctx.client.instance_id()),
                        ),
                    ],
                )
                .await?;
            }
            tokio::time::sleep(sleep).await;
            Ok(TaskOutcome::Complete)
        });
    }
    let pool = b.build()?;
    let mut cb = ClientConfig::builder()
        .heartbeat_interval(Duration::from_millis(500))
        .instance_ttl(Duration::from_secs(5))
        .leader_election(false)
        .statements(crate::output::statements())
        .pool_size(a.concurrency + 4);
    if let Some(id) = a.instance_id {
        cb = cb.instance_id(InstanceId::new(id)?);
    }
    let client = Client::builder(dsn)
        .config(cb.build()?)
        .service(pool)
        .build()
        .await?;
    client.start().await?;
    println!("working as instance {}", client.instance_id());
    wait_for_signal().await;
    client.stop().await?;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
