//! What the pages show, read from the database: the overview, instances, run and task lists,
//! task and tenant details. (The run page's ledger timeline is in `timeline`.) Every struct
//! here is also the page's JSON.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::error::UiError;
use super::filters::{RunQuery, TaskQuery, TimeBound};
use crate::coord::instance::{self, InstanceRow};
use crate::coord::leader::{self, LeaderRow};
use crate::coord::leader_history::{self, LeaderTerm};
use crate::db::Acquire;
use crate::db::{Db, Executor};
use crate::ids::{TaskId, TenantId};
use crate::queue::{self, QueuePauseEvent, TaskEvent, TaskRow, TaskState};
use crate::runs::Run;
use crate::tenancy::{self, BudgetSnapshot, CostFilter, CostRow, Tenant};

type Res<T> = Result<T, UiError>;

/// The database's time.
pub(crate) async fn db_now(db: &Db) -> Res<DateTime<Utc>> {
    Ok(db.query_one(sql!("ui/now"), typed![]).await?.try_get(0)?)
}

/// One queue's depth by state: `available` (with the oldest's age), `running`, `scheduled` and
/// `retryable` (those due once their time comes; tasks waiting for parents are not counted
/// here), and `completed (5 min)`, `discarded (5 min)`, `cancelled (5 min)`: finished in the
/// last five minutes.
#[derive(Debug, Clone, Serialize)]
pub struct QueueSummary {
    /// The queue.
    pub queue: String,
    /// Tasks per state.
    pub states: BTreeMap<String, i64>,
    /// Seconds since the oldest available task became due.
    pub oldest_available_age_s: Option<f64>,
    /// Its pauses (for every tenant: `tenant_id` `None`; or for single tenants).
    pub pauses: Vec<QueuePause>,
    /// Tasks finished and their mean latency per minute of the last hour, oldest first
    /// (minutes without finished tasks are absent).
    pub minutes: Vec<QueueMinute>,
}

/// A pause of a queue.
#[derive(Debug, Clone, Serialize, postgres_from_row::FromRow)]
pub struct QueuePause {
    /// The queue.
    #[serde(skip)]
    pub queue: String,
    /// The tenant paused alone (`None`: every tenant).
    pub tenant_id: Option<String>,
    /// Since when.
    pub paused_at: DateTime<Utc>,
    /// Who paused it from the console, if it was paused there.
    pub paused_by: Option<String>,
}

/// One minute of a queue's finished tasks (written by the leader's maintenance).
#[derive(Debug, Clone, Serialize, postgres_from_row::FromRow)]
pub struct QueueMinute {
    /// The queue.
    #[serde(skip)]
    pub queue: String,
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// Tasks finished in it (completed, discarded, cancelled).
    pub finished: i64,
    /// Completed tasks with a claim (those the latency is over).
    pub timed: i64,
    /// Their mean time from due to finished (wait + run), in milliseconds.
    pub latency_ms: Option<f64>,
}

/// A stuck run (`pgcrew.stuck_runs`).
#[derive(Debug, Clone, Serialize, postgres_from_row::FromRow)]
pub struct StuckRun {
    /// The run.
    pub run_id: uuid::Uuid,
    /// Its tenant.
    pub tenant_id: String,
    /// Its agent.
    pub agent_name: Option<String>,
    /// Its state.
    pub state: String,
    /// The instance that ran it.
    pub instance_id: Option<String>,
    /// Seconds since it started (or was created).
    pub age_s: f64,
    /// Why it is stuck.
    pub reason: String,
}

/// A stale instance (`pgcrew.stale_instances`).
#[derive(Debug, Clone, Serialize, postgres_from_row::FromRow)]
pub struct StaleInstance {
    /// The instance.
    pub id: String,
    /// Its host.
    pub hostname: String,
    /// Its process id.
    pub pid: i32,
    /// Seconds since its last heartbeat.
    pub silent_s: f64,
    /// The lease it still holds, if any.
    pub leader_of: Option<String>,
}

/// The overview page.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// The database's time.
    pub now: DateTime<Utc>,
    /// Live instances.
    pub instances: Vec<InstanceRow>,
    /// Leader leases.
    pub leaders: Vec<LeaderRow>,
    /// Leader terms, newest first (`pgcrew.leader_history`, the same on every instance).
    pub leader_history: Vec<LeaderTerm>,
    /// Queues.
    pub queues: Vec<QueueSummary>,
    /// The newest pauses and resumes of queues from the console, newest first.
    pub queue_pause_events: Vec<QueuePauseEvent>,
    /// Runs per live state (`pending`, `running`, `waiting`) and finished in the last hour
    /// (`completed (1 h)`, ...).
    pub run_states: BTreeMap<String, i64>,
    /// Tenants' budgets.
    pub tenants: Vec<Tenant>,
    /// Stuck runs.
    pub stuck_runs: Vec<StuckRun>,
    /// Stale instances.
    pub stale_instances: Vec<StaleInstance>,
}

/// Leader terms shown on the overview.
pub const LEADER_HISTORY_LEN: i64 = 50;

fn queue_entry(queues: &mut BTreeMap<String, QueueSummary>, queue: String) -> &mut QueueSummary {
    queues.entry(queue.clone()).or_insert_with(|| QueueSummary {
        queue,
        states: BTreeMap::new(),
        oldest_available_age_s: None,
        pauses: Vec::new(),
        minutes: Vec::new(),
    })
}

/// Read the overview.
pub(crate) async fn overview(db: &Db) -> Res<Overview> {
    let now = db_now(db).await?;
    let instances = instance::list(db).await?;
    let leaders = leader::current(db).await?;
    let leader_history = leader_history::history(db, LEADER_HISTORY_LEN).await?;
    let mut queues: BTreeMap<String, QueueSummary> = BTreeMap::new();
    for r in db.query(sql!("ui/queue_depth"), typed![]).await? {
        let q = queue_entry(&mut queues, r.try_get(0)?);
        q.states.insert(r.try_get(1)?, r.try_get(2)?);
        if let Some(age) = r.try_get::<_, Option<f64>>(3)? {
            q.oldest_available_age_s = Some(age);
        }
    }
    let pauses: Vec<QueuePause> =
        crate::db::rows_as(&db.query(sql!("ui/queue_pauses"), typed![]).await?)?;
    for p in pauses {
        queue_entry(&mut queues, p.queue.clone()).pauses.push(p);
    }
    let minutes: Vec<QueueMinute> =
        crate::db::rows_as(&db.query(sql!("ui/queue_minutes"), typed![]).await?)?;
    for m in minutes {
        queue_entry(&mut queues, m.queue.clone()).minutes.push(m);
    }
    let queue_pause_events = queue::queue_pause_events(db, None, 20).await?;
    let run_states = db
        .query(sql!("ui/run_states"), typed![])
        .await?
        .iter()
        .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?;
    let tenants = tenancy::tenants::list(db).await?;
    let stuck_runs = crate::db::rows_as(&db.query(sql!("ui/stuck_runs"), typed![]).await?)?;
    let stale_instances =
        crate::db::rows_as(&db.query(sql!("ui/stale_instances"), typed![]).await?)?;
    Ok(Overview {
        now,
        instances,
        leaders,
        leader_history,
        queues: queues.into_values().collect(),
        queue_pause_events,
        run_states,
        tenants,
        stuck_runs,
        stale_instances,
    })
}

/// The instances page.
#[derive(Debug, Clone, Serialize)]
pub struct Instances {
    /// The database's time.
    pub now: DateTime<Utc>,
    /// Live instances.
    pub instances: Vec<InstanceRow>,
    /// Leader leases.
    pub leaders: Vec<LeaderRow>,
    /// Stale instances.
    pub stale_instances: Vec<StaleInstance>,
}

/// Read the instances page.
pub(crate) async fn instances(db: &Db) -> Res<Instances> {
    Ok(Instances {
        now: db_now(db).await?,
        instances: instance::list(db).await?,
        leaders: leader::current(db).await?,
        stale_instances: crate::db::rows_as(
            &db.query(sql!("ui/stale_instances"), typed![]).await?,
        )?,
    })
}

/// The run list.
#[derive(Debug, Clone, Serialize)]
pub struct RunList {
    /// The filter applied.
    pub filter: RunQuery,
    /// The runs, newest first.
    pub runs: Vec<Run>,
}

/// Read the run list.
pub(crate) async fn runs(db: &Db, filter: RunQuery) -> Res<RunList> {
    let (since_at, since_ago) = TimeBound::parts(&filter.since);
    let (until_at, until_ago) = TimeBound::parts(&filter.until);
    let mut conn = db.acquire().await?;
    let tx = conn.begin().await?;
    tx.execute(sql!("ui/custom_plans"), typed![]).await?;
    let rows = tx
        .query(
            sql!("ui/runs"),
            typed![
                &filter.tenant,
                &filter.state,
                &filter.agent,
                &since_at,
                &since_ago,
                &until_at,
                &until_ago,
                &filter.limit
            ],
        )
        .await?;
    tx.commit().await?;
    Ok(RunList {
        runs: crate::db::rows_as(&rows)?,
        filter,
    })
}

/// The task list.
#[derive(Debug, Clone, Serialize)]
pub struct TaskList {
    /// The filter applied.
    pub filter: TaskQuery,
    /// The tasks, newest first.
    pub tasks: Vec<TaskRow>,
    /// With a `payload` filter: how the search was made and how far it went.
    pub payload_search: Option<PayloadSearch>,
    /// Where the next page starts (`before=` this id), when there may be more.
    pub next_before: Option<i64>,
}

/// How a payload search was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchMode {
    /// Through a GIN index on `pgcrew.tasks(payload)`: every task is searched.
    Index,
    /// No such index: at most `window` tasks were looked at (see [`WindowOver`]);
    /// `next_before` continues further back.
    Bounded,
}

/// What a bounded payload search's window is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowOver {
    /// The newest tasks of all (read through the primary key); the other filters apply
    /// inside the window.
    AllTasks,
    /// Every task matching the other filters (a state of `available` or `running`, with
    /// `queue` and `tenant` at most, read through the state's partial index, when at most
    /// `window` tasks match).
    FilteredTasks,
}

/// A payload search's report (the page's notice, also in the JSON).
#[derive(Debug, Clone, Serialize)]
pub struct PayloadSearch {
    /// `index` or `bounded`.
    pub mode: SearchMode,
    /// Bounded: the most tasks one search looks at.
    pub window: Option<i64>,
    /// Bounded: what the window is made of.
    pub window_over: Option<WindowOver>,
    /// Bounded: the tasks looked at (fewer than `window` once the oldest task was reached).
    pub scanned: Option<i64>,
    /// Bounded: how many of them matched the other filters.
    pub filtered: Option<i64>,
    /// Bounded: the newest and oldest task id looked at.
    pub scanned_ids: Option<(i64, i64)>,
    /// Whether the search reached the oldest task (nothing further back).
    pub complete: bool,
    /// What was searched, in words.
    pub message: String,
    /// Bounded: the statement that creates the index (then every task is searched).
    pub index_sql: Option<String>,
}

/// The statement that creates the GIN index the payload filter uses when it exists.
pub const PAYLOAD_INDEX_SQL: &str = "CREATE INDEX CONCURRENTLY tasks_payload_idx ON pgcrew.tasks USING gin (payload jsonb_path_ops);";

/// The payload filter's settings and the cached catalog look-up for its index.
#[derive(Debug)]
pub(crate) struct PayloadSearchConfig {
    window: i64,
    ttl: std::time::Duration,
    checked: std::sync::Mutex<Option<(std::time::Instant, bool)>>,
}

impl PayloadSearchConfig {
    pub(crate) fn new(window: i64, ttl: std::time::Duration) -> Self {
        PayloadSearchConfig {
            window: window.max(1),
            ttl,
            checked: std::sync::Mutex::new(None),
        }
    }

    /// Whether a GIN index on `pgcrew.tasks(payload)` exists (looked up at most once per TTL).
    async fn has_index<E: Executor + ?Sized>(&self, tx: &E) -> Res<bool> {
        if let Ok(c) = self.checked.lock()
            && let Some((at, found)) = *c
            && at.elapsed() < self.ttl
        {
            return Ok(found);
        }
        let found: bool = tx
            .query_one(sql!("ui/payload_index"), typed![])
            .await?
            .try_get(0)?;
        if let Ok(mut c) = self.checked.lock() {
            *c = Some((std::time::Instant::now(), found));
        }
        Ok(found)
    }
}

/// The bounded payload search (no GIN index on payload): see `ui/tasks_payload_window.sql`.
async fn bounded_search<E: Executor + ?Sized>(
    tx: &E,
    cfg: &PayloadSearchConfig,
    filter: &TaskQuery,
) -> Res<TaskList> {
    // Only filters the state's partial index answers by itself (its columns are queue and
    // tenant), so the probe reads no more than `window + 1` index entries.
    let over_filtered = match filter.state {
        Some(TaskState::Available | TaskState::Running) if filter.kind.is_none() => {
            let probe = cfg.window + 1;
            let n: i64 = tx
                .query_one(
                    sql!("ui/tasks_filter_probe"),
                    typed![
                        &filter.queue,
                        &filter.state,
                        &filter.tenant,
                        &filter.kind,
                        &filter.before,
                        &probe
                    ],
                )
                .await?
                .try_get(0)?;
            n <= cfg.window
        }
        _ => false,
    };
    let rows = tx
        .query(
            sql!("ui/tasks_payload_window"),
            typed![
                &filter.queue,
                &filter.state,
                &filter.tenant,
                &filter.kind,
                &filter.payload,
                &filter.limit,
                &filter.before,
                &cfg.window,
                &over_filtered
            ],
        )
        .await?;
    let first = rows.first();
    let scanned: i64 = first.map(|r| r.try_get(0)).transpose()?.unwrap_or(0);
    let filtered: i64 = first.map(|r| r.try_get(1)).transpose()?.unwrap_or(0);
    let oldest: Option<i64> = first.map(|r| r.try_get(2)).transpose()?.flatten();
    let newest: Option<i64> = first.map(|r| r.try_get(3)).transpose()?.flatten();
    let mut tasks: Vec<TaskRow> = Vec::with_capacity(rows.len());
    for r in &rows {
        if r.try_get::<_, Option<i64>>("id")?.is_some() {
            tasks.push(crate::db::row_as(r)?);
        }
    }
    let complete = over_filtered || scanned < cfg.window;
    let next_before = if tasks.len() as i64 >= filter.limit {
        tasks.last().map(|t| t.id.0)
    } else if complete {
        None
    } else {
        oldest
    };
    let range = match (newest, oldest) {
        (Some(n), Some(o)) => format!(" (ids {n} down to {o})"),
        _ => String::new(),
    };
    let below = match filter.before {
        Some(b) => format!(" below task {b}"),
        None => String::new(),
    };
    let window = cfg.window;
    let what = if over_filtered {
        format!("Searched all {scanned} tasks matching the other filters{below}{range}")
    } else if narrowed(filter) {
        format!(
            "Searched the newest {scanned} tasks{below}{range}, {filtered} of them matching the other filters"
        )
    } else {
        format!("Searched the newest {scanned} tasks{below}{range}")
    };
    let message = format!(
        "{what}: the payload filter has no index, so one search looks at no more than {window} tasks. Narrow it with queue, state, tenant or kind (a state of available or running, with queue or tenant, searches every such task when at most {window} match), search further back, or create the GIN index: {PAYLOAD_INDEX_SQL}"
    );
    Ok(TaskList {
        tasks,
        payload_search: Some(PayloadSearch {
            mode: SearchMode::Bounded,
            window: Some(window),
            window_over: Some(if over_filtered {
                WindowOver::FilteredTasks
            } else {
                WindowOver::AllTasks
            }),
            scanned: Some(scanned),
            filtered: Some(filtered),
            scanned_ids: newest.zip(oldest),
            complete,
            message,
            index_sql: Some(PAYLOAD_INDEX_SQL.to_string()),
        }),
        next_before,
        filter: filter.clone(),
    })
}

fn narrowed(f: &TaskQuery) -> bool {
    f.queue.is_some() || f.state.is_some() || f.tenant.is_some() || f.kind.is_some()
}

/// Read the task list. A `payload` filter searches every task through a GIN index on
/// `pgcrew.tasks(payload)` when one exists; otherwise it looks at no more than the newest
/// `window` tasks matching the other filters and says so, with a continuation.
pub(crate) async fn tasks(db: &Db, cfg: &PayloadSearchConfig, filter: TaskQuery) -> Res<TaskList> {
    let mut conn = db.acquire().await?;
    let tx = conn.begin().await?;
    tx.execute(sql!("ui/custom_plans"), typed![]).await?;
    let bounded = match &filter.payload {
        Some(_) => !cfg.has_index(&tx).await?,
        None => false,
    };
    if bounded {
        let search = bounded_search(&tx, cfg, &filter).await?;
        tx.commit().await?;
        return Ok(search);
    }
    let rows = tx
        .query(
            sql!("ui/tasks"),
            typed![
                &filter.queue,
                &filter.state,
                &filter.tenant,
                &filter.kind,
                &filter.payload,
                &filter.limit,
                &filter.before
            ],
        )
        .await?;
    tx.commit().await?;
    let tasks: Vec<TaskRow> = crate::db::rows_as(&rows)?;
    let next_before = if tasks.len() as i64 >= filter.limit {
        tasks.last().map(|t| t.id.0)
    } else {
        None
    };
    let payload_search = filter.payload.as_ref().map(|_| PayloadSearch {
        mode: SearchMode::Index,
        window: None,
        window_over: None,
        scanned: None,
        filtered: None,
        scanned_ids: None,
        complete: next_before.is_none(),
        message: "Searched every task through the GIN index on payload.".to_string(),
        index_sql: None,
    });
    Ok(TaskList {
        tasks,
        payload_search,
        next_before,
        filter,
    })
}

/// How many tasks match a filter.
pub(crate) async fn count_tasks(db: &Db, f: &TaskQuery) -> Res<i64> {
    let mut conn = db.acquire().await?;
    let tx = conn.begin().await?;
    tx.execute(sql!("ui/custom_plans"), typed![]).await?;
    let row = tx
        .query_one(
            sql!("ui/tasks_count"),
            typed![&f.queue, &f.state, &f.tenant, &f.kind, &f.payload],
        )
        .await?;
    tx.commit().await?;
    Ok(row.try_get(0)?)
}

/// The next `n` task ids matching a filter after `after`.
pub(crate) async fn task_batch(db: &Db, f: &TaskQuery, after: i64, n: i64) -> Res<Vec<TaskId>> {
    let rows = db
        .query(
            sql!("ui/tasks_batch"),
            typed![
                &f.queue, &f.state, &f.tenant, &f.kind, &f.payload, &after, &n
            ],
        )
        .await?;
    rows.iter()
        .map(|r| Ok(TaskId(r.try_get(0)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(|e| UiError::from(crate::Error::from(e)))
}

/// A parent or child of a task.
#[derive(Debug, Clone, Serialize, postgres_from_row::FromRow)]
pub struct Relative {
    /// `parent` or `child`.
    pub relation: String,
    /// The task.
    pub id: i64,
    /// Its kind.
    pub kind: String,
    /// Its state.
    pub state: String,
}

/// The task page.
#[derive(Debug, Clone, Serialize)]
pub struct TaskDetail {
    /// The task (attempts, errors, claim).
    pub task: TaskRow,
    /// Its parents and children.
    pub relatives: Vec<Relative>,
    /// Actions people took on it (cancel, retry: who, when), oldest first.
    pub events: Vec<TaskEvent>,
}

/// Read a task.
pub(crate) async fn task(db: &Db, id: TaskId) -> Res<TaskDetail> {
    let task = queue::get(db, id).await?;
    let parents = task.depends_on.clone().unwrap_or_default();
    let relatives = crate::db::rows_as(
        &db.query(sql!("ui/task_relatives"), typed![&id.0, &parents])
            .await?,
    )?;
    let events = queue::task_events(db, id).await?;
    Ok(TaskDetail {
        task,
        relatives,
        events,
    })
}

/// The tenants page.
#[derive(Debug, Clone, Serialize)]
pub struct Tenants {
    /// Every tenant with its budget figures.
    pub tenants: Vec<Tenant>,
}

/// Read the tenants.
pub(crate) async fn tenants(db: &Db) -> Res<Tenants> {
    Ok(Tenants {
        tenants: tenancy::tenants::list(db).await?,
    })
}

/// The tenant page.
#[derive(Debug, Clone, Serialize)]
pub struct TenantDetail {
    /// Configuration (capabilities, limits, thresholds, degradation rules) and figures.
    pub tenant: Tenant,
    /// The budget snapshot.
    pub budget: BudgetSnapshot,
    /// Cost by day, category and model.
    pub costs: Vec<CostRow>,
    /// The newest budget decisions recorded in the tenant's runs' ledgers, newest first.
    pub decisions: Vec<BudgetDecision>,
}

/// A budget decision recorded in a run's ledger: a reservation refused (`budget_exceeded`), a
/// settled cost past a limit, after which reservations are refused (`budget_overrun`), or a
/// model step changed by the tenant's degradation policy (`budget_degraded`).
#[derive(Debug, Clone, Serialize, postgres_from_row::FromRow)]
pub struct BudgetDecision {
    /// The run.
    pub run_id: uuid::Uuid,
    /// The event's place in the run's ledger.
    pub seq: i64,
    /// When.
    pub created_at: DateTime<Utc>,
    /// `budget_exceeded`, `budget_overrun` or `budget_degraded`.
    pub event_type: String,
    /// The step.
    pub step_key: Option<String>,
    /// The event's payload (scope, limit, spent, requested or cost, model, message; for
    /// `budget_degraded`: status, applied rules, requested and used model and max_tokens, skip,
    /// reason).
    pub payload: serde_json::Value,
}

/// Budget decisions shown on the tenant page.
pub const DECISIONS_LEN: i64 = 50;

/// Read a tenant.
pub(crate) async fn tenant(db: &Db, id: &TenantId) -> Res<TenantDetail> {
    let tenant = tenancy::tenants::get(db, id).await?;
    let budget = tenancy::budget_status(db, id).await?;
    let costs = tenancy::cost_breakdown(db, &CostFilter::tenant(id.clone())).await?;
    let decisions = crate::db::rows_as(
        &db.query(sql!("ui/tenant_decisions"), typed![id, &DECISIONS_LEN])
            .await?,
    )?;
    Ok(TenantDetail {
        tenant,
        budget,
        costs,
        decisions,
    })
}
