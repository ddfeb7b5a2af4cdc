//! Phase 5 of the demo: live progress, the kill -9 of the leader, the failover and the runs
//! that finish elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use pgcrew::db::Db;
use pgcrew::queue;
use pgcrew::runs::{self, RunFilter, RunState};
use pgcrew::{Result, RunId};

use super::instances::Instances;
use super::workload::Workload;
use super::{ACME, QUEUE};

pub(super) struct Tick {
    pub(super) by_state: BTreeMap<&'static str, usize>,
    pub(super) tasks_done: i64,
    pub(super) tasks_total: i64,
    pub(super) leader: Option<(String, i64)>,
}

pub(super) async fn tick(db: &Db) -> Result<(Tick, Vec<runs::Run>)> {
    let filter = RunFilter {
        limit: 10_000,
        ..RunFilter::default()
    };
    let all = runs::list_runs(db, &filter).await?;
    let mut by_state = BTreeMap::new();
    for r in &all {
        *by_state.entry(r.state.as_str()).or_insert(0) += 1;
    }
    let conn = db.get().await?;
    let stats = queue::stats(&conn).await?;
    let (mut done, mut total) = (0, 0);
    for s in stats.iter().filter(|s| s.queue == QUEUE) {
        total += s.tasks;
        if matches!(s.state.as_str(), "completed" | "discarded" | "cancelled") {
            done += s.tasks;
        }
    }
    let leader = pgcrew::coord::leader::current(db)
        .await?
        .into_iter()
        .find(|l| l.valid)
        .map(|l| (l.leader_id, l.term));
    Ok((
        Tick {
            by_state,
            tasks_done: done,
            tasks_total: total,
            leader,
        },
        all,
    ))
}

pub(super) fn short(run: RunId) -> String {
    run.to_string()[..8].to_string()
}

/// What the watch saw: the leaders in order, the kill, and the killed leader's runs.
#[derive(Default)]
pub(super) struct Failover {
    pub(super) leaders: Vec<(String, i64)>,
    pub(super) killed: Option<(String, Instant)>,
    pub(super) victim_runs: BTreeSet<RunId>,
    pub(super) resumed: BTreeSet<RunId>,
    pub(super) reported: bool,
}

impl Failover {
    /// Kill the leader once it executes a run, then submit the second wave of runs; a leader
    /// that runs none for 8 s gets the second wave first and is killed once it runs one of
    /// those (or after 16 s regardless).
    async fn maybe_kill(
        &mut self,
        t: &Tick,
        all: &[runs::Run],
        elapsed: Duration,
        instances: &mut Instances,
        workload: &mut Workload,
    ) -> Result<()> {
        let (None, Some((leader, term))) = (&self.killed, &t.leader) else {
            return Ok(());
        };
        // Prefer a moment when the leader runs a run of the tenant with budget (so the
        // resumed run completes), then any run, then (after 8 s) whatever it is doing.
        let busy_with = |acme_only: bool| -> Vec<RunId> {
            all.iter()
                .filter(|r| {
                    r.state == RunState::Running
                        && r.lease_owner.as_deref() == Some(leader.as_str())
                        && (!acme_only || r.tenant_id == ACME)
                })
                .map(|r| r.id)
                .collect()
        };
        let busy = busy_with(elapsed <= Duration::from_secs(4));
        if busy.is_empty() || elapsed <= Duration::from_millis(1500) {
            // The leader ran no run while the first wave lasted (on a busy machine the other
            // instances may take them all): send the second wave now and give the leader 8 s
            // more to take one of those, then kill it whatever it is doing.
            if elapsed > Duration::from_secs(8) && !workload.all_submitted() {
                println!(
                    ">>> the leader {leader} ran no agent run during the first wave: the second wave goes now, before the kill"
                );
                workload.submit_second_wave().await?;
            }
            if elapsed <= Duration::from_secs(16) {
                return Ok(());
            }
        }
        instances.kill9(leader);
        println!(
            ">>> kill -9 of the leader {leader} (term {term}) while it runs {} agent run(s): {}",
            busy.len(),
            busy.iter()
                .map(|r| short(*r))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.victim_runs.extend(busy);
        self.killed = Some((leader.clone(), Instant::now()));
        if workload.all_submitted() {
            return Ok(());
        }
        workload.submit_second_wave().await
    }

    /// Report the new leader and the killed leader's runs that resumed or finished elsewhere.
    fn report(&mut self, t: &Tick, all: &[runs::Run]) {
        let Some((victim, at)) = &self.killed else {
            return;
        };
        if !self.reported
            && let Some((l, term)) = &t.leader
            && l != victim
        {
            println!(
                ">>> failover: {l} is the new leader (term {term}), {:.1}s after the kill",
                at.elapsed().as_secs_f64()
            );
            self.reported = true;
        }
        for r in all.iter().filter(|r| self.victim_runs.contains(&r.id)) {
            if self.resumed.contains(&r.id) {
                continue;
            }
            let elsewhere = r.lease_owner.as_deref().is_some_and(|o| o != victim);
            if elsewhere || r.state.is_terminal() {
                self.resumed.insert(r.id);
                let how = match r.lease_owner.as_deref() {
                    Some(o) if o != victim => format!("resumed on {o}"),
                    _ => format!("finished ({}) on another instance", r.state.as_str()),
                };
                println!(
                    ">>> run {} {how}, {:.1}s after the kill",
                    short(r.id),
                    at.elapsed().as_secs_f64()
                );
            }
        }
    }
}

/// One progress line: runs by state, tasks done and the leader.
fn print_progress(t: &Tick, since: Instant) {
    let states: Vec<String> = ["pending", "running", "completed", "failed", "cancelled"]
        .iter()
        .map(|s| format!("{s} {}", t.by_state.get(s).copied().unwrap_or(0)))
        .collect();
    let leader = t
        .leader
        .as_ref()
        .map(|(l, term)| format!("{l} (term {term})"))
        .unwrap_or_else(|| "none (election pending)".into());
    println!(
        "[{:>4.1}s] runs: {} | tasks done {}/{} | leader {leader}",
        since.elapsed().as_secs_f64(),
        states.join(", "),
        t.tasks_done,
        t.tasks_total
    );
}

/// Phase 5: watch until every run and task is done and the failover was seen; `None` (after
/// saying so) when that takes longer than `timeout_secs`.
pub(super) async fn watch(
    db: &Db,
    timeout_secs: u64,
    instances: &mut Instances,
    workload: &mut Workload,
) -> Result<Option<Failover>> {
    let t0 = Instant::now();
    let mut last_print = Instant::now() - Duration::from_secs(2);
    let mut f = Failover::default();
    let limit = Duration::from_secs(timeout_secs);
    loop {
        let (t, all) = tick(db).await?;
        if let Some(l) = &t.leader
            && f.leaders.last() != Some(l)
        {
            f.leaders.push(l.clone());
        }
        f.maybe_kill(&t, &all, t0.elapsed(), instances, workload)
            .await?;
        f.report(&t, &all);
        let all_done = workload.all_submitted()
            && f.reported
            && all.iter().all(|r| r.state.is_terminal())
            && t.tasks_done >= t.tasks_total;
        if last_print.elapsed() >= Duration::from_secs(1) || all_done {
            last_print = Instant::now();
            print_progress(&t, t0);
        }
        if all_done {
            return Ok(Some(f));
        }
        if t0.elapsed() > limit {
            eprintln!("error: the workload did not finish within {timeout_secs} s");
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
