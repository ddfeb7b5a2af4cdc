//! Phase 4 of the demo: agent runs for both tenants (half before the failover, half after)
//! and plain tasks.

use std::sync::Arc;

use pgcrew::agent::{AgentRuntime, demo};
use pgcrew::db::Db;
use pgcrew::kernel::Kernel;
use pgcrew::model::ScriptedModel;
use pgcrew::queue::{self, NewTask};
use pgcrew::{Result, RunId, SessionId, TenantId};

use super::{ACME, GLOBEX, QUEUE};

/// The runs to submit and those submitted so far.
pub(super) struct Workload {
    submitter: AgentRuntime,
    /// The tenants, `acme` then `globex`.
    pub(super) tenants: [TenantId; 2],
    plan: Vec<(&'static str, SessionId, String)>,
    first_wave: usize,
    submitted: Vec<RunId>,
}

impl Workload {
    /// True when both waves are submitted.
    pub(super) fn all_submitted(&self) -> bool {
        self.submitted.len() == self.plan.len()
    }

    async fn submit(&mut self, skip: usize, take: usize) -> Result<()> {
        for (agent, session, prompt) in self.plan.iter().skip(skip).take(take) {
            let run = self.submitter.submit(agent, *session, prompt).await?;
            self.submitted.push(run);
        }
        Ok(())
    }

    /// Submit the runs kept for after the failover.
    pub(super) async fn submit_second_wave(&mut self) -> Result<()> {
        self.submit(self.first_wave, usize::MAX).await
    }
}

/// The plan: `runs` runs alternating between the tenants' sessions, every third a billing
/// run, the others support questions.
fn plan(runs: usize, sessions: [SessionId; 2]) -> Vec<(&'static str, SessionId, String)> {
    let cities = ["Oslo", "Lisbon", "Denver", "Osaka", "Nairobi"];
    (0..runs)
        .map(|i| {
            let session = sessions[i % 2];
            if i % 3 == 2 {
                (
                    demo::BILLING_AGENT,
                    session,
                    format!("Charge customer C-{i} for order B-{}", 2000 + i),
                )
            } else {
                (
                    demo::SUPPORT_AGENT,
                    session,
                    format!(
                        "Where is order A-{}? Will the weather in {} delay it?",
                        1000 + i,
                        cities[i % cities.len()]
                    ),
                )
            }
        })
        .collect()
}

/// `tasks` plain tasks alternating between the tenants: every fourth a `demo.noop`, the others
/// `demo.sleep` of 150 to 650 ms.
async fn enqueue_tasks(db: &Db, tasks: usize, tenants: &[TenantId; 2]) -> Result<()> {
    let conn = db.get().await?;
    for i in 0..tasks {
        let tenant = &tenants[i % 2];
        let task = if i % 4 == 3 {
            NewTask::new(demo::DEMO_NOOP, &serde_json::json!({}))?
        } else {
            NewTask::new(
                demo::DEMO_SLEEP,
                &demo::SleepPayload {
                    ms: 150 + (i as u64 * 137) % 500,
                },
            )?
        };
        queue::enqueue(&conn, &task.queue(QUEUE).tenant(tenant.clone())).await?;
    }
    Ok(())
}

/// Phase 4: submit the first wave of runs and the plain tasks.
pub(super) async fn submit_workload(db: &Db, runs: usize, tasks: usize) -> Result<Workload> {
    let submitter = AgentRuntime::new(
        Kernel::new(db.clone(), Arc::new(ScriptedModel::demo_agent())),
        "pgcrew-demo",
    );
    let tenants = [TenantId::new(ACME)?, TenantId::new(GLOBEX)?];
    let acme_session = submitter.new_session(&tenants[0], "acme-support").await?;
    let globex_session = submitter.new_session(&tenants[1], "globex-support").await?;
    let plan = plan(runs, [acme_session.id, globex_session.id]);
    let first_wave = plan.len().div_ceil(2);
    let mut workload = Workload {
        submitter,
        tenants,
        plan,
        first_wave,
        submitted: Vec::new(),
    };
    workload.submit(0, first_wave).await?;
    enqueue_tasks(db, tasks, &workload.tenants).await?;
    println!(
        "submitted {} agent runs and {} plain tasks; {} more runs after the failover\n",
        first_wave,
        tasks,
        workload.plan.len() - first_wave
    );
    Ok(workload)
}
