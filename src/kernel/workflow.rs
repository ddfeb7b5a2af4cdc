//! Workflow steps: deterministic code checkpointed in the ledger.
//!
//! [`Kernel::run_workflow`] runs a closure that receives a [`WorkflowCtx`]; each
//! [`WorkflowCtx::step`] runs its function once and records the serialised result as
//! `workflow_step_completed` (step key `wf/<name>`). Re-running the workflow after a crash
//! returns recorded results instead of running those steps again, so it resumes where it
//! stopped; a workflow whose `workflow_completed` is recorded returns its recorded result
//! without running the closure at all.
//!
//! A workflow can also wait durably: [`WorkflowCtx::wait_for_signal`] and [`WorkflowCtx::sleep`]
//! park the run (`waiting`, no lease, its task scheduled until the deadline) and return
//! [`Error::Waiting`], which the workflow passes on with `?`; a task handler returns then (map
//! the error with [`waiting_outcome`]). A signal or the deadline resumes the run on any
//! instance, the workflow runs again and the wait returns the signal's payload (see
//! [`super::wait`]).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::instrument;

use super::wait::OnTimeout;
use super::{Kernel, RunScope, validate_step_key};
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::RunId;
use crate::runs::{NewEvent, append_events};
use crate::vocab::EventType;

const COMPLETED_KEY: &str = "wf";

/// The context handed to a workflow closure (cheap to clone).
#[derive(Debug, Clone)]
pub struct WorkflowCtx {
    kernel: Kernel,
    scope: RunScope,
    recorded: Arc<BTreeMap<String, Value>>,
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl WorkflowCtx {
    /// The run.
    pub fn run(&self) -> RunId {
        self.scope.run
    }

    /// The run scope (for model and tool steps inside the workflow).
    pub fn scope(&self) -> &RunScope {
        &self.scope
    }

    /// The kernel (for [`Kernel::step_model`] / [`Kernel::step_tool`] inside the workflow).
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// True when step `name` has a recorded result (it will not run again).
    pub fn is_recorded(&self, name: &str) -> bool {
        self.recorded.contains_key(&step_key(name))
    }

    /// Wait durably for signal `name` for at most `timeout` (step `wf/signal:<name>`, a name used
    /// once per execution): `Some(payload)` when the signal arrived (a signal sent earlier is
    /// kept and returned at once), `None` when the timeout passed (recorded as
    /// `wait_timed_out`). While neither happened the run is parked and this returns
    /// [`Error::Waiting`]: return it from the workflow with `?`.
    pub async fn wait_for_signal(&self, name: &str, timeout: Duration) -> Result<Option<Value>> {
        self.wait_for_signal_with(name, timeout, OnTimeout::Return)
            .await
    }

    /// [`wait_for_signal`](Self::wait_for_signal) with a timeout policy ([`OnTimeout::FailRun`]
    /// fails the run when the timeout passes).
    pub async fn wait_for_signal_with(
        &self,
        name: &str,
        timeout: Duration,
        on_timeout: OnTimeout,
    ) -> Result<Option<Value>> {
        let key = format!("wf/signal:{name}");
        self.claim(&key)?;
        self.kernel
            .wait_for(&self.scope, &key, name, timeout, on_timeout)
            .await
    }

    /// Sleep durably for `duration` (step `wf/sleep:<name>`): the run is parked meanwhile (see
    /// [`wait_for_signal`](Self::wait_for_signal)); the signal `name` ends the sleep early.
    pub async fn sleep(&self, name: &str, duration: Duration) -> Result<()> {
        let key = format!("wf/sleep:{name}");
        self.claim(&key)?;
        self.kernel
            .wait_for(&self.scope, &key, name, duration, OnTimeout::Return)
            .await
            .map(drop)
    }

    /// Mark step key `key` used in this execution ([`Error::InvalidInput`] when it already is).
    fn claim(&self, key: &str) -> Result<()> {
        validate_step_key(key)?;
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.insert(key.to_string()) {
            Ok(())
        } else {
            Err(Error::invalid(
                "workflow step",
                format!("step `{key}` is used twice in one workflow: give each step a unique name"),
            ))
        }
    }

    /// Run `f` once for this run and step `name` and checkpoint its result; on a re-run return
    /// the recorded result without calling `f`. A step name may be used once per execution
    /// ([`Error::InvalidInput`] otherwise). An error from `f` is recorded as
    /// `workflow_step_failed` and returned (the step runs again on the next execution).
    #[instrument(skip(self, f), fields(run = %self.scope.run), err)]
    pub async fn step<T, F, Fut>(&self, name: &str, f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let key = step_key(name);
        self.claim(&key)?;
        if let Some(v) = self.recorded.get(&key) {
            return serde_json::from_value(v.clone()).map_err(|e| Error::ReplayConsistency {
                step_key: key.clone(),
                message: format!(
                    "the recorded result does not deserialise into the step's type: {e}"
                ),
            });
        }
        match f().await {
            Ok(v) => {
                let output = serde_json::to_value(&v)?;
                let ev = NewEvent::new(
                    EventType::WorkflowStepCompleted,
                    json!({ "output": output }),
                )
                .step(key)
                .idempotent();
                append_events(
                    self.kernel.db(),
                    self.scope.run,
                    &[ev],
                    self.scope.lease_token,
                )
                .await?;
                Ok(v)
            }
            Err(e) => {
                self.kernel
                    .record(
                        &self.scope,
                        &key,
                        EventType::WorkflowStepFailed,
                        json!({ "message": e.to_string() }),
                    )
                    .await?;
                Err(e)
            }
        }
    }
}

fn step_key(name: &str) -> String {
    format!("wf/{name}")
}

/// What a task handler returns for a run that is now parked at a durable wait
/// ([`Error::Waiting`]): `Some(snooze until the deadline)` (the wait already parked the task, so
/// the acknowledgement changes nothing; the snooze is the fallback for a task the wait did not
/// find), `None` for any other error.
pub fn waiting_outcome(e: &Error) -> Option<crate::queue::TaskOutcome> {
    match e {
        Error::Waiting { resume_in, .. } => Some(crate::queue::TaskOutcome::Snooze(*resume_in)),
        _ => None,
    }
}

impl Kernel {
    /// Run a checkpointed workflow on `scope.run` (see the [module docs](self)).
    #[instrument(skip(self, f), fields(run = %scope.run), err)]
    pub async fn run_workflow<T, F, Fut>(&self, scope: &RunScope, f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(WorkflowCtx) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut recorded = BTreeMap::new();
        let mut completed = None;
        {
            let conn = self.db().get().await?;
            for r in conn
                .query(sql!("kernel/run_step_events"), typed![&scope.run])
                .await?
            {
                let event_type: String = r.try_get(1)?;
                let key: String = r.try_get(2)?;
                let payload: Value = r.try_get(3)?;
                match EventType::from_name(&event_type) {
                    Some(EventType::WorkflowStepCompleted) => {
                        recorded.insert(key, payload.get("output").cloned().unwrap_or(Value::Null));
                    }
                    Some(EventType::WorkflowCompleted) if key == COMPLETED_KEY => {
                        completed = Some(payload.get("output").cloned().unwrap_or(Value::Null));
                    }
                    _ => {}
                }
            }
        }
        if let Some(v) = completed {
            return Ok(serde_json::from_value(v)?);
        }
        // Resumes a waiting run (`run_resumed`) in one statement; another tenant's run is not
        // found and nothing changes.
        crate::runs::resume_if_waiting(
            self.db(),
            scope.run,
            Some(&scope.tenant),
            self.instance.as_ref(),
            scope.lease_token,
        )
        .await?;
        let ctx = WorkflowCtx {
            kernel: self.clone(),
            scope: scope.clone(),
            recorded: Arc::new(recorded),
            used: Arc::new(Mutex::new(BTreeSet::new())),
        };
        let out = f(ctx).await?;
        let ev = NewEvent::new(
            EventType::WorkflowCompleted,
            json!({ "output": serde_json::to_value(&out)? }),
        )
        .step(COMPLETED_KEY)
        .idempotent();
        append_events(self.db(), scope.run, &[ev], scope.lease_token).await?;
        Ok(out)
    }
}
