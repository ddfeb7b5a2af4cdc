//! Fenced run leases on database time.
//!
//! A worker takes a run with [`acquire_run_lease`] and gets a fencing token
//! (`pgcrew.runs.lease_token`, incremented whenever a new holder takes the run). Appends and
//! state changes made with that token are rejected with [`Error::LeaseLost`] once the lease has
//! expired or another worker holds the run. Expired leases can be taken over. Lease owners are
//! instance ids (optionally `instance-id/worker`), so the leader's maintenance can release the
//! leases of instances that are gone.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::instrument;

use super::map_db_error;
use super::state::Run;
use crate::config::interval_micros;
use crate::db::Db;
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::{InstanceId, RunId};

/// A held run lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunLease {
    /// The run.
    pub run_id: RunId,
    /// The holder.
    pub owner: String,
    /// The fencing token to pass with appends and transitions.
    pub token: i64,
    /// Expiry (database time).
    pub expires_at: DateTime<Utc>,
}

fn check_ttl(ttl: Duration) -> Result<i64> {
    if ttl < Duration::from_millis(1) {
        return Err(Error::invalid("ttl", "must be at least 1ms"));
    }
    Ok(interval_micros(ttl))
}

/// Take the lease on a pending or running run for `owner` for `ttl`. Returns `Ok(None)` when
/// another owner holds an unexpired lease; re-acquiring one's own live lease keeps the token.
#[instrument(skip(db), err)]
pub async fn acquire_run_lease(
    db: &Db,
    run: RunId,
    owner: &str,
    ttl: Duration,
) -> Result<Option<RunLease>> {
    crate::ids::validate_text_id("lease owner", owner)?;
    let ttl = check_ttl(ttl)?;
    let row = db
        .query_opt(sql!("runs/acquire_lease"), typed![&run, &owner, &ttl])
        .await
        .map_err(|e| map_db_error(e, run))?;
    match row {
        Some(r) => Ok(Some(RunLease {
            run_id: run,
            owner: owner.to_string(),
            token: r.get(0),
            expires_at: r.get(1),
        })),
        None => {
            // Distinguish "held by someone else" from "no such run" / "finished".
            let run_row = super::state::get_run(db, run).await?;
            if run_row.state.is_terminal() {
                return Err(Error::IllegalTransition {
                    entity: "run",
                    id: run.to_string(),
                    from: run_row.state.to_string(),
                    to: "leased".into(),
                });
            }
            Ok(None)
        }
    }
}

/// A run taken by [`lease_run`]: its lease and the run as the taking left it.
#[derive(Debug, Clone, Serialize)]
pub struct LeasedRun {
    /// The lease now held.
    pub lease: RunLease,
    /// The run after the lease was taken (and, if its wait had resolved, after it resumed).
    pub run: Run,
}

/// Take the lease on a run for `owner` for `ttl` and, when the run is waiting and its wait has
/// resolved (a signal of the wait's name is there, or the wait's deadline has passed), resume
/// it on `instance`: the signal is consumed and `signal_received` (or `wait_timed_out`) is
/// recorded under the wait's step key with the new lease, and the run is running again. One
/// statement and one commit (`pgcrew.lease_run`, V025) for what [`acquire_run_lease`], a read of
/// the run and the wait step's resolution did in three; the wait step then answers from the
/// ledger when the run's code reaches it again.
///
/// `Ok(None)` when another owner holds an unexpired lease; [`Error::IllegalTransition`] for a
/// finished run and [`Error::NotFound`] for an unknown one. Re-taking one's own live lease keeps
/// the token.
#[instrument(skip(db), err)]
pub async fn lease_run(
    db: &Db,
    run: RunId,
    owner: &str,
    ttl: Duration,
    instance: Option<&InstanceId>,
) -> Result<Option<LeasedRun>> {
    crate::ids::validate_text_id("lease owner", owner)?;
    let ttl = check_ttl(ttl)?;
    let instance = instance.map(|i| i.to_string());
    let row = db
        .query_opt(
            sql!("runs/lease_run"),
            typed![&run, &owner, &ttl, &instance],
        )
        .await
        .map_err(|e| map_db_error(e, run))?
        .ok_or_else(|| Error::not_found("run", run))?;
    let current = crate::db::row_as::<Run>(&row)?;
    if current.state.is_terminal() {
        return Err(Error::IllegalTransition {
            entity: "run",
            id: run.to_string(),
            from: current.state.to_string(),
            to: "leased".into(),
        });
    }
    Ok(held_by(current, owner))
}

/// `run` as `owner` holds it after a lease was taken: `None` when its lease is another owner's
/// or no longer valid (the caller checks for a finished run).
fn held_by(run: Run, owner: &str) -> Option<LeasedRun> {
    if run.lease_owner.as_deref() != Some(owner) || !run.lease_valid {
        return None;
    }
    let expires_at = run.lease_expires_at?;
    Some(LeasedRun {
        lease: RunLease {
            run_id: run.id,
            owner: owner.to_string(),
            token: run.lease_token,
            expires_at,
        },
        run,
    })
}

/// How a worker pool takes the run leases of the tasks it claims, in the claim's own
/// transaction (see `WorkerPoolBuilder::lease_runs_of`): the owner the handler takes leases
/// as, their TTL, and the instance a resumed run moves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLeasing {
    owner: String,
    ttl: Duration,
    instance: Option<InstanceId>,
}

impl RunLeasing {
    /// Leases for `owner` (an instance id, optionally `instance-id/worker`) lasting `ttl`
    /// (at least 1 ms); a resumed run moves to `instance` when given.
    pub fn new(
        owner: impl Into<String>,
        ttl: Duration,
        instance: Option<InstanceId>,
    ) -> Result<Self> {
        let owner = owner.into();
        crate::ids::validate_text_id("lease owner", &owner)?;
        check_ttl(ttl)?;
        Ok(RunLeasing {
            owner,
            ttl,
            instance,
        })
    }

    /// The lease owner.
    pub fn owner(&self) -> &str {
        &self.owner
    }
}

/// Try to take the leases of `runs` (each with the tenant of the task that names it) as
/// `leasing` says, on `on` (the claim's transaction), never waiting: a run whose lock another
/// transaction holds, a run of another tenant, a finished run and a run another owner holds are
/// left out (the handler takes or fails to take its lease itself). The runs whose lease is now
/// `leasing`'s owner's, each taken (and resumed) as [`lease_run`] does (`pgcrew.lease_runs`,
/// V029).
pub(crate) async fn lease_runs<E: Executor + ?Sized>(
    on: &E,
    runs: &[(RunId, crate::ids::TenantId)],
    leasing: &RunLeasing,
) -> Result<Vec<LeasedRun>> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<uuid::Uuid> = runs.iter().map(|(r, _)| r.0).collect();
    let tenants: Vec<&str> = runs.iter().map(|(_, t)| t.as_str()).collect();
    let ttl = check_ttl(leasing.ttl)?;
    let instance = leasing.instance.as_ref().map(|i| i.to_string());
    let rows = on
        .query(
            sql!("runs/lease_runs"),
            typed![&ids, &tenants, &leasing.owner, &ttl, &instance],
        )
        .await?;
    let mut taken = Vec::with_capacity(rows.len());
    for row in &rows {
        let run = crate::db::row_as::<Run>(row)?;
        if !run.state.is_terminal()
            && let Some(l) = held_by(run, &leasing.owner)
        {
            taken.push(l);
        }
    }
    Ok(taken)
}

/// Extend a lease for `ttl` from now. [`Error::LeaseLost`] when it expired or was taken.
#[instrument(skip(db, lease), fields(run = %lease.run_id, token = lease.token), err)]
pub async fn renew_run_lease(db: &Db, lease: &RunLease, ttl: Duration) -> Result<RunLease> {
    let ttl = check_ttl(ttl)?;
    let row = db
        .query_opt(
            sql!("runs/renew_lease"),
            typed![&lease.run_id, &lease.owner, &lease.token, &ttl],
        )
        .await?;
    match row {
        Some(r) => Ok(RunLease {
            expires_at: r.get(0),
            ..lease.clone()
        }),
        None => Err(Error::LeaseLost(format!(
            "run {}: lease token {} of {} expired or was taken over",
            lease.run_id, lease.token, lease.owner
        ))),
    }
}

/// Give a lease up. Returns false when it was no longer held (nothing changed).
#[instrument(skip(db, lease), fields(run = %lease.run_id, token = lease.token), err)]
pub async fn release_run_lease(db: &Db, lease: &RunLease) -> Result<bool> {
    let row = db
        .query_one(
            sql!("runs/release_lease"),
            typed![&lease.run_id, &lease.owner, &lease.token],
        )
        .await?;
    Ok(row.get(0))
}
