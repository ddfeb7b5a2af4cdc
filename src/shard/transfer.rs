//! Moving a tenant between shards: [`move_tenant`]. The steps (docs/scaling.md has them for
//! operators):
//!
//! 1. **Mark** the tenant `moving` in the routing map (saved to the routing file when given):
//!    clients that load it refuse the tenant's new work ([`Error::TenantMoving`]).
//! 2. **Drain**: wait until the tenant has no unfinished task and no run pending or running on
//!    the source (runs parked at a durable wait may stay: they move with their wait).
//! 3. **Copy** in one source transaction that locks the tenant's row (new runs, sessions and
//!    costs of the tenant wait on it) and reads one snapshot: the tenant, its settings,
//!    schedules, sessions, runs (with their recorded ledger heads), events, chain anchors,
//!    signed checkpoints, artifacts, summaries, waits, signals, budget reservations and cost
//!    entries, written on the target in one transaction marked as a transfer (V032).
//! 4. **Verify** on the target: every run's hash chain ([`crate::runs::verify_run_chain`]) is
//!    valid and ends at the source's head; with the ledger key, the signed checkpoints verify.
//!    On failure the copy is deleted from the target and the source is untouched.
//! 5. **Delete** the tenant on the source (same transaction as the copy's read; committed only
//!    after the target verified).
//! 6. **Switch** the map: the tenant routes to the target, its `moving` mark is cleared.
//!
//! Ledger key: checkpoint MACs cover (run id, seq, head hash) only, nothing of the
//! installation, so with one ledger key for every shard (recommended) they verify on the target
//! unchanged. With a different key on the target, give both: the move verifies the checkpoints
//! with the source key first, then signs them again with the target's. The installation
//! secret (advisory-lock keys) differs per shard: `runs.lock_key` is derived again on insert.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::ShardedClient;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::ids::{RunId, TenantId};
use crate::ledger_key::LedgerKey;

/// What [`move_tenant`] moves and how.
#[derive(Debug, Clone)]
pub struct MoveOptions {
    /// The tenant.
    pub tenant: TenantId,
    /// The shard it is on.
    pub from: String,
    /// The shard it goes to.
    pub to: String,
    /// How long to wait for the tenant's work to finish (default 5 min).
    pub drain_timeout: Duration,
    /// The ledger key of the source (and of the target unless `target_ledger_key` is given):
    /// the signed checkpoints are verified with it.
    pub ledger_key: Option<LedgerKey>,
    /// The target's ledger key when it differs: checkpoints are signed again with it.
    pub target_ledger_key: Option<LedgerKey>,
    /// The routing file to update (marks and switch); `None`: the client's map only.
    pub routes_file: Option<PathBuf>,
}

impl MoveOptions {
    /// Move `tenant` from shard `from` to `to` (drain timeout 5 min, no key, no file).
    pub fn new(tenant: TenantId, from: impl Into<String>, to: impl Into<String>) -> MoveOptions {
        MoveOptions {
            tenant,
            from: from.into(),
            to: to.into(),
            drain_timeout: Duration::from_secs(300),
            ledger_key: None,
            target_ledger_key: None,
            routes_file: None,
        }
    }
}

/// What a move did.
#[derive(Debug, Clone, Serialize)]
pub struct MoveReport {
    /// The tenant.
    pub tenant: String,
    /// Source shard.
    pub from: String,
    /// Target shard.
    pub to: String,
    /// Time spent draining, ms.
    pub drained_ms: u64,
    /// Runs moved (each chain verified on the target).
    pub runs: usize,
    /// Ledger events moved.
    pub events: i64,
    /// Other rows moved (tenant, sessions, runs, checkpoints, costs, ...).
    pub rows: i64,
    /// Runs parked at a durable wait that moved with their wait.
    pub waiting_runs: i64,
    /// Checkpoints signed again with the target's key.
    pub checkpoints_resigned: usize,
    /// Rows deleted on the source (finished tasks included).
    pub deleted_on_source: i64,
    /// Tenant roles on the source: roles belong to a cluster and are not moved; create and
    /// grant them on the target (`pgcrew tenants grant-role`).
    pub roles_not_moved: Vec<String>,
}

fn fail(tenant: &TenantId, message: impl Into<String>) -> Error {
    Error::TenantTransfer {
        tenant: tenant.to_string(),
        message: message.into(),
    }
}

async fn activity(db: &Db, tenant: &TenantId) -> Result<(i64, i64, i64)> {
    let conn = db.get().await?;
    let r = conn
        .query_one(sql!("shard/tenant_activity"), &[&tenant.as_str()])
        .await?;
    Ok((r.get(0), r.get(1), r.get(2)))
}

/// Wait until the tenant has no unfinished task and no run pending or running.
async fn drain(db: &Db, opts: &MoveOptions) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let (tasks, runs, _) = activity(db, &opts.tenant).await?;
        if tasks == 0 && runs == 0 {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= opts.drain_timeout {
            return Err(fail(
                &opts.tenant,
                format!(
                    "not drained after {:?}: {tasks} unfinished tasks, {runs} runs pending or running on `{}`; nothing was copied or deleted (cancel them or retry with a longer drain timeout)",
                    opts.drain_timeout, opts.from
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Move a tenant between shards of `client` (the steps: `docs/scaling.md`, "Moving a tenant").
/// The client's routing map (and the routing file, when given) is switched at the end.
///
/// Errors: [`Error::TenantNotRouted`] / [`Error::UnknownShard`] for a tenant or shard the map
/// does not have; [`Error::TenantTransfer`] naming the step that stopped (not drained, schema
/// versions differ, the tenant already exists on the target, a chain that does not verify);
/// [`Error::ShardDown`]. Until the delete step commits the source keeps everything, and a
/// stopped move clears the tenant's `moving` mark.
pub async fn move_tenant(client: &ShardedClient, opts: &MoveOptions) -> Result<MoveReport> {
    let tenant = &opts.tenant;
    let mut routes = client.routes();
    let on = routes.shard_of(tenant.as_str())?.to_string();
    if on != opts.from {
        return Err(fail(
            tenant,
            format!("the routing map has it on `{on}`, not `{}`", opts.from),
        ));
    }
    let source = client.shard_db(&opts.from).await?;
    let target = client.shard_db(&opts.to).await?;
    routes.begin_move(tenant.as_str(), &opts.to)?;
    publish(client, opts, &routes)?;
    match copy_verify_delete(&source, &target, opts).await {
        Ok(report) => {
            routes.finish_move(tenant.as_str())?;
            publish(client, opts, &routes)?;
            Ok(report)
        }
        Err(e) => {
            routes.abandon_move(tenant.as_str());
            // Keep the first error; a failure to restore the map is reported with it.
            if let Err(e2) = publish(client, opts, &routes) {
                return Err(fail(
                    tenant,
                    format!("{e}; and restoring the routing map failed: {e2}"),
                ));
            }
            Err(e)
        }
    }
}

fn publish(client: &ShardedClient, opts: &MoveOptions, routes: &super::RoutingMap) -> Result<()> {
    if let Some(path) = &opts.routes_file {
        routes.save(path)?;
    }
    client.set_routes(routes.clone())
}

async fn copy_verify_delete(source: &Db, target: &Db, opts: &MoveOptions) -> Result<MoveReport> {
    let tenant = &opts.tenant;
    let t = tenant.as_str();
    let (sv, tv) = (source.check_schema().await?, target.check_schema().await?);
    if sv != tv {
        return Err(fail(
            tenant,
            format!(
                "schema versions differ (`{}` at {sv}, `{}` at {tv}): migrate both shards to the same version first",
                opts.from, opts.to
            ),
        ));
    }
    {
        let conn = target.get().await?;
        let exists: bool = conn
            .query_one(sql!("shard/tenant_exists"), &[&t])
            .await?
            .get(0);
        if exists {
            return Err(fail(
                tenant,
                format!(
                    "it already exists on `{}`: a tenant lives on one shard (if an earlier move stopped after its copy, delete that copy there first); nothing was copied",
                    opts.to
                ),
            ));
        }
    }
    let drained = drain(source, opts).await?;

    // Copy: one snapshot of the source under the tenant's row lock.
    let mut sconn = source.get().await?;
    let stx = sconn
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await?;
    if stx
        .query_opt(sql!("shard/lock_tenant"), &[&t])
        .await?
        .is_none()
    {
        return Err(Error::not_found("tenant", tenant));
    }
    let (tasks, running, waiting) = {
        let r = stx.query_one(sql!("shard/tenant_activity"), &[&t]).await?;
        (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2))
    };
    if tasks != 0 || running != 0 {
        return Err(fail(
            tenant,
            "new work arrived while draining (a client without the `moving` mark?): retry the move",
        ));
    }
    let data: Value = stx
        .query_one(sql!("shard/export_tenant"), &[&t])
        .await?
        .get(0);
    let heads: Vec<(RunId, i64)> = stx
        .query(sql!("shard/tenant_runs"), &[&t])
        .await?
        .iter()
        .map(|r| (RunId(r.get(0)), r.get(1)))
        .collect();
    let mut events = Vec::with_capacity(heads.len());
    for (run, _) in &heads {
        let ev: Value = stx
            .query_one(sql!("shard/export_run_events"), &[&run.0])
            .await?
            .get(0);
        events.push(ev);
    }
    let roles: Vec<String> = stx
        .query(sql!("shard/tenant_roles"), &[&t])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // With two keys, the source's signatures are checked before they are replaced.
    let resign = match (&opts.ledger_key, &opts.target_ledger_key) {
        (Some(src), Some(dst)) => {
            for (run, _) in &heads {
                let v = crate::runs::verify_run_chain_signed(source, *run, src).await?;
                if !v.valid {
                    return Err(fail(
                        tenant,
                        format!(
                            "run {run} does not verify on the source with its ledger key ({}); nothing was copied",
                            v.problem.unwrap_or_default()
                        ),
                    ));
                }
            }
            Some(dst)
        }
        _ => None,
    };

    // Write on the target.
    let mut tconn = target.get().await?;
    let ttx = tconn.transaction().await?;
    ttx.execute(sql!("shard/begin_transfer"), &[&t]).await?;
    let rows: i64 = ttx
        .query_one(sql!("shard/import_tenant"), &[&data])
        .await?
        .get(0);
    let mut event_count = 0i64;
    for ev in &events {
        let n: i64 = ttx
            .query_one(sql!("shard/import_run_events"), &[ev])
            .await?
            .get(0);
        event_count += n;
    }
    let mut resigned = 0;
    if let Some(key) = resign {
        for r in ttx.query(sql!("shard/tenant_checkpoints"), &[&t]).await? {
            let (run, seq, head): (uuid::Uuid, i64, Vec<u8>) = (r.get(0), r.get(1), r.get(2));
            let mac = key.sign(RunId(run), seq, &head).to_vec();
            ttx.execute(sql!("shard/resign_checkpoint"), &[&run, &seq, &mac])
                .await?;
            resigned += 1;
        }
    }
    ttx.execute(sql!("shard/end_transfer"), &[]).await?;
    ttx.commit().await?;

    // Verify on the target; undo the copy when anything is off.
    let key = opts.target_ledger_key.as_ref().or(opts.ledger_key.as_ref());
    if let Err(problem) = verify(target, &heads, key).await {
        let undo = delete(target, t).await;
        return Err(fail(
            tenant,
            format!(
                "{problem} on `{}`; the copy was {} and `{}` keeps the tenant",
                opts.to,
                match undo {
                    Ok(_) => "deleted".to_string(),
                    Err(e) => format!("NOT deleted ({e})"),
                },
                opts.from
            ),
        ));
    }

    // Delete on the source (still under the row lock and snapshot that were copied).
    stx.execute(sql!("shard/begin_transfer"), &[&t]).await?;
    let deleted: i64 = stx
        .query_one(sql!("shard/delete_tenant"), &[&t])
        .await?
        .get(0);
    stx.execute(sql!("shard/end_transfer"), &[]).await?;
    stx.commit().await?;

    Ok(MoveReport {
        tenant: t.to_string(),
        from: opts.from.clone(),
        to: opts.to.clone(),
        drained_ms: drained.as_millis() as u64,
        runs: heads.len(),
        events: event_count,
        rows,
        waiting_runs: waiting,
        checkpoints_resigned: resigned,
        deleted_on_source: deleted,
        roles_not_moved: roles,
    })
}

/// Every run's chain on `db` valid and at the source's head (signed checkpoints too, with a
/// key); the first problem otherwise.
async fn verify(
    db: &Db,
    heads: &[(RunId, i64)],
    key: Option<&LedgerKey>,
) -> std::result::Result<(), String> {
    for (run, head) in heads {
        let chain = crate::runs::verify_run_chain(db, *run)
            .await
            .map_err(|e| format!("run {run} could not be verified: {e}"))?;
        if !chain.valid || chain.head_seq != *head {
            return Err(format!(
                "run {run}'s chain does not verify (head {} of {head}: {})",
                chain.head_seq,
                chain.problem.unwrap_or_default()
            ));
        }
        if let Some(key) = key {
            let signed = crate::runs::verify_run_chain_signed(db, *run, key)
                .await
                .map_err(|e| format!("run {run} could not be verified: {e}"))?;
            if !signed.valid {
                return Err(format!(
                    "run {run}'s signed checkpoints do not verify ({})",
                    signed.problem.unwrap_or_default()
                ));
            }
        }
    }
    Ok(())
}

/// Delete the tenant on `db` in a transfer transaction.
async fn delete(db: &Db, tenant: &str) -> Result<i64> {
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    tx.execute(sql!("shard/begin_transfer"), &[&tenant]).await?;
    let n: i64 = tx
        .query_one(sql!("shard/delete_tenant"), &[&tenant])
        .await?
        .get(0);
    tx.execute(sql!("shard/end_transfer"), &[]).await?;
    tx.commit().await?;
    Ok(n)
}
