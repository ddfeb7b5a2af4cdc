//! Coordination checks: the leader, the instances, stuck runs, queue lag.

use super::{Ctx, InstanceRow, human, human_ms, human_secs};
use crate::doctor::{CheckId, Finding};
use crate::error::Result;
use crate::ids::RunId;

pub(super) async fn leader(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::Leader;
    let name = &ctx.opts.lease_name;
    let row = ctx.client.query_opt(sql!("doctor/leader"), &[name]).await?;
    let advice = "make sure at least one instance runs with leader election on (the default); \
                  while nobody leads, maintenance stops: stale instances and their claims are not \
                  released, stuck runs are not failed, retention does not run";
    let Some(row) = row else {
        return Ok(Finding::fail(
            check,
            format!("no leader: nobody holds the lease `{name}`"),
            advice,
        ));
    };
    let leader_id: String = row.try_get("leader_id")?;
    let term: i64 = row.try_get("term")?;
    let valid: bool = row.try_get("valid")?;
    let remaining: i64 = row.try_get("remaining_ms")?;
    let registered: bool = row.try_get("registered")?;
    Ok(if !valid {
        Finding::fail(
            check,
            format!(
                "no leader: the lease `{name}` of {leader_id} (term {term}) expired {} ago and \
                 nobody took it over",
                human_ms(-remaining)
            ),
            advice,
        )
        .items(vec![leader_id], ctx.opts.max_items)
    } else if !registered {
        Finding::warn(
            check,
            format!(
                "the lease `{name}` is held by {leader_id} (term {term}, {} left), which is \
                 not a registered instance",
                human_ms(remaining)
            ),
            "something outside pgcrew's instances holds the lease (a script, an old \
             process): find it; the lease lapses by itself unless renewed",
        )
        .items(vec![leader_id], ctx.opts.max_items)
    } else {
        Finding::pass(
            check,
            format!(
                "{leader_id} leads (lease `{name}`, term {term}, renewed: {} left)",
                human_ms(remaining)
            ),
        )
    })
}

pub(super) async fn instances(ctx: &mut Ctx<'_>) -> Result<Finding> {
    let check = CheckId::Instances;
    let ttl = ctx.opts.instance_ttl;
    let max_items = ctx.opts.max_items;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let rows = ctx.instances().await?.clone();
    if rows.is_empty() {
        return Ok(Finding::fail(
            check,
            "no instance is registered: nothing works the queues or runs agents",
            "start the instances (a service linking pgcrew, or `pgcrew serve`) against this \
             database",
        ));
    }
    let stale: Vec<&InstanceRow> = rows.iter().filter(|r| r.silent_ms > ttl_ms).collect();
    let loudest = rows.iter().map(|r| r.silent_ms).max().unwrap_or(0);
    if !stale.is_empty() {
        return Ok(Finding::fail(
            check,
            format!(
                "{} of {} instance(s) silent for longer than the instance TTL ({})",
                stale.len(),
                rows.len(),
                human(ttl)
            ),
            "a stale instance has stopped (or lost the database) without deregistering; the \
             leader removes it and releases its claims and run leases. If it is still \
             running, find out why its heartbeats stop (pool exhausted, network); if no \
             leader is removing it, see the leader check",
        )
        .items(
            stale
                .iter()
                .map(|r| {
                    format!(
                        "{} (host {}, pid {}): silent for {}",
                        r.id,
                        r.hostname,
                        r.pid,
                        human_ms(r.silent_ms)
                    )
                })
                .collect(),
            max_items,
        ));
    }
    Ok(Finding::pass(
        check,
        format!(
            "{} instance(s), all heartbeating (longest silence {}, TTL {})",
            rows.len(),
            human_ms(loudest),
            human(ttl)
        ),
    ))
}

pub(super) async fn stuck_runs(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::StuckRuns;
    let limit = i64::try_from(ctx.opts.max_items).unwrap_or(i64::MAX);
    let rows = ctx
        .client
        .query(sql!("doctor/stuck_runs"), &[&limit])
        .await?;
    let Some(first) = rows.first() else {
        return Ok(Finding::pass(
            check,
            "no run is stuck (pgcrew.stuck_runs is empty)",
        ));
    };
    let total: i64 = first.try_get("total")?;
    let mut items = Vec::with_capacity(rows.len() + 1);
    for r in &rows {
        let run: RunId = r.try_get("run_id")?;
        let tenant: String = r.try_get("tenant_id")?;
        let agent: Option<String> = r.try_get("agent_name")?;
        let state: String = r.try_get("state")?;
        let reason: String = r.try_get("reason")?;
        let age: f64 = r.try_get("age_s")?;
        items.push(format!(
            "run {run} (tenant {tenant}, agent {}, {state}): {reason}, age {}",
            agent.as_deref().unwrap_or("-"),
            human_secs(age)
        ));
    }
    if total > rows.len() as i64 {
        items.push(format!("... and {} more", total - rows.len() as i64));
    }
    Ok(Finding {
        items,
        ..Finding::fail(
            check,
            format!("{total} stuck run(s) in pgcrew.stuck_runs"),
            "a running run whose lease expired or whose instance is gone is resumed by an \
             instance serving its agent, or failed by the leader's maintenance after \
             stuck_run_timeout: check that the leader and such instances run. A pending run \
             older than an hour has no instance serving its agent. Cancel what should not \
             run with `pgcrew run cancel <run>`",
        )
    })
}

pub(super) async fn queue_lag(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::QueueLag;
    let rows = ctx.client.query(sql!("doctor/queue_lag"), &[]).await?;
    let max = ctx.opts.max_queue_lag.as_secs_f64();
    let mut over = Vec::new();
    let mut worst: Option<(String, f64)> = None;
    for r in &rows {
        let queue: String = r.try_get("queue")?;
        let due: i64 = r.try_get("due")?;
        let lag: f64 = r.try_get("lag_s")?;
        if worst.as_ref().is_none_or(|(_, w)| lag > *w) {
            worst = Some((queue.clone(), lag));
        }
        if lag > max {
            over.push(format!(
                "queue {queue}: {due} due task(s), the oldest waiting {}",
                human_secs(lag)
            ));
        }
    }
    let threshold = human(ctx.opts.max_queue_lag);
    Ok(match worst {
        None => Finding::pass(check, "no task is waiting to be claimed"),
        Some(_) if !over.is_empty() => Finding::warn(
            check,
            format!(
                "{} queue(s) lag more than {threshold} (the oldest due, available task's wait)",
                over.len()
            ),
            "no running instance works these queues, their workers are saturated, or tenant \
             concurrency limits hold the tasks back: check `pgcrew tasks stats`, the instances' \
             queues and concurrency, and `pgcrew tenants list`",
        )
        .items(over, ctx.opts.max_items),
        Some((queue, lag)) => Finding::pass(
            check,
            format!(
                "{} queue(s) with due tasks; the longest wait is {} (queue {queue}), within \
                 {threshold}",
                rows.len(),
                human_secs(lag)
            ),
        ),
    })
}
