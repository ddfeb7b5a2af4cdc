//! Agent runs under [`ReplayPolicy::ForkOnDrift`](crate::kernel::ReplayPolicy::ForkOnDrift):
//! when a resumed run's model step drifted, the kernel executed it in a fork of the run; the
//! agent run is handed over to that fork and goes on there.
//!
//! The hand-over is one transaction: the fork's agent-run task is enqueued (so any instance
//! resumes the fork if this one dies) and the parent is cancelled with a reason naming the
//! fork. The fork is then driven at once, on this instance, under a lease owner of its own
//! (`{instance}/fork`: the fork's task, claimed meanwhile by another worker, finds the lease
//! held and is snoozed until the fork is finished). A crash before
//! the hand-over commits is harmless: the parent's retried task replays to the same drift, the
//! kernel finds the fork already made, replays its recorded step, and hands over then.

use tokio_util::sync::CancellationToken;

use super::def::agent_queue;
use super::runtime::{AgentRunTask, AgentRuntime};
use crate::error::Result;
use crate::kernel::{ModelStep, RunScope};
use crate::queue::{self, NewTask};
use crate::runs::{self, Run};

impl AgentRuntime {
    /// Hand the run of `scope` over to the fork `step` was recorded in (`step.run`), then drive
    /// the fork to its end: the fork's final run.
    pub(super) async fn continue_in_fork(
        &self,
        scope: &RunScope,
        agent: &str,
        step_key: &str,
        step: &ModelStep,
        cancel: Option<CancellationToken>,
    ) -> Result<Run> {
        let fork = step.run;
        let db = self.kernel().db();
        let mut conn = db.get().await?;
        let tx = conn.transaction().await?;
        let task = NewTask::new(super::AGENT_RUN_KIND, &AgentRunTask { run_id: fork })?
            .queue(agent_queue(agent))
            .tenant(scope.tenant.clone())
            .run(fork)
            .unique_key(format!("agent_run:{fork}"));
        queue::enqueue(&tx, &task).await?;
        let reason = format!(
            "the request of step {step_key} drifted (fork_on_drift): continued in run {fork}"
        );
        runs::cancel_run(&tx, scope.run, &reason).await?;
        tx.commit().await?;
        let driver = self.sub_owner("fork");
        Box::pin(driver.execute(fork, cancel)).await
    }
}
