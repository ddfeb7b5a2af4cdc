//! The incremental harness: a run's work split into named units, each with progress snapshots
//! persisted as artifacts (`harness/<unit>/progress`, versioned) and a clean-state check that
//! must pass before the unit is marked done (`harness_unit_completed`, step key
//! `harness/<unit>`). Running the harness again does only the units not yet done; a unit that
//! was interrupted gets its last progress snapshot back so it can continue where it stopped.
//!
//! ```no_run
//! use pgcrew::kernel::{Harness, Kernel, RunScope};
//! use serde_json::json;
//!
//! # async fn demo(kernel: Kernel, scope: RunScope) -> pgcrew::Result<()> {
//! let harness = Harness::new(kernel)
//!     .unit("download", |ctx| async move {
//!         ctx.save_progress(json!({"files": 3})).await?;
//!         Ok(json!({"files": 3}))
//!     })
//!     .unit("index", |_ctx| async move { Ok(json!("indexed")) });
//! let report = harness.run(&scope).await?;
//! println!("ran {:?}, skipped {:?}", report.ran, report.skipped);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Value, json};
use tracing::instrument;

use super::{Kernel, RunScope, validate_step_key};
use crate::error::{Error, Result};
use crate::runs::{self, NewEvent, append_events};
use crate::vocab::EventType;

type BoxFut<T> = Pin<Box<dyn Future<Output = Result<T>> + Send>>;
type Work = Arc<dyn Fn(UnitCtx) -> BoxFut<Value> + Send + Sync>;
type Check = Arc<dyn Fn(UnitCtx, Value) -> BoxFut<std::result::Result<(), String>> + Send + Sync>;

/// What a unit's work and clean-state check get.
#[derive(Debug, Clone)]
pub struct UnitCtx {
    kernel: Kernel,
    scope: RunScope,
    unit: String,
    progress: Option<Value>,
}

impl UnitCtx {
    /// The unit's name.
    pub fn unit(&self) -> &str {
        &self.unit
    }

    /// The run scope.
    pub fn scope(&self) -> &RunScope {
        &self.scope
    }

    /// The kernel (for model/tool steps inside the unit).
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The last progress snapshot saved by an earlier, interrupted attempt of this unit.
    pub fn progress(&self) -> Option<&Value> {
        self.progress.as_ref()
    }

    /// Persist a progress snapshot (a new version of artifact `harness/<unit>/progress`).
    #[instrument(skip(self, value), fields(run = %self.scope.run, unit = %self.unit), err)]
    pub async fn save_progress(&self, value: Value) -> Result<()> {
        runs::put_artifact(
            self.kernel.db(),
            self.scope.run,
            &progress_key(&self.unit),
            value,
            self.scope.lease_token,
        )
        .await?;
        Ok(())
    }
}

struct Unit {
    name: String,
    work: Work,
    check: Option<Check>,
}

/// A set of units (see the [module docs](self)).
pub struct Harness {
    kernel: Kernel,
    units: Vec<Unit>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field(
                "units",
                &self.units.iter().map(|u| &u.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What one [`Harness::run`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HarnessReport {
    /// Units executed (and marked done) by this call, in order.
    pub ran: Vec<String>,
    /// Units skipped because an earlier call marked them done.
    pub skipped: Vec<String>,
    /// Every unit's output, in unit order.
    pub outputs: Vec<(String, Value)>,
}

fn progress_key(unit: &str) -> String {
    format!("harness/{unit}/progress")
}

fn step_key(unit: &str) -> String {
    format!("harness/{unit}")
}

impl Harness {
    /// An empty harness.
    pub fn new(kernel: Kernel) -> Self {
        Self {
            kernel,
            units: Vec::new(),
        }
    }

    /// Add a unit (units run in the order they are added).
    pub fn unit<F, Fut>(mut self, name: impl Into<String>, work: F) -> Self
    where
        F: Fn(UnitCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value>> + Send + 'static,
    {
        self.units.push(Unit {
            name: name.into(),
            work: Arc::new(move |ctx| Box::pin(work(ctx))),
            check: None,
        });
        self
    }

    /// Set the clean-state check of the unit added last: it receives the unit's output and
    /// returns `Err(reason)` when the unit left things unclean (the unit is then not marked
    /// done, `harness_unit_unclean` is recorded and [`Error::UncleanState`] returned).
    pub fn clean_check<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn(UnitCtx, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), String>> + Send + 'static,
    {
        if let Some(u) = self.units.last_mut() {
            u.check = Some(Arc::new(move |ctx, v| {
                let fut = check(ctx, v);
                Box::pin(async move { Ok(fut.await) })
            }));
        }
        self
    }

    fn validate(&self) -> Result<()> {
        let mut seen = std::collections::BTreeSet::new();
        for u in &self.units {
            validate_step_key(&step_key(&u.name))?;
            crate::ids::validate_text_id("harness unit", &u.name)?;
            if !seen.insert(u.name.as_str()) {
                return Err(Error::invalid(
                    "harness unit",
                    format!("unit `{}` is defined twice", u.name),
                ));
            }
        }
        if self.units.is_empty() {
            return Err(Error::invalid("harness", "add at least one unit"));
        }
        Ok(())
    }

    /// Run every unit not yet marked done on `scope.run`, in order; stop at the first error.
    #[instrument(skip(self), fields(run = %scope.run), err)]
    pub async fn run(&self, scope: &RunScope) -> Result<HarnessReport> {
        self.validate()?;
        let run = runs::get_run(self.kernel.db(), scope.run).await?;
        if run.tenant_id != scope.tenant {
            return Err(Error::not_found("run", scope.run));
        }
        let mut report = HarnessReport::default();
        for u in &self.units {
            let key = step_key(&u.name);
            let events = self.kernel.step_events(scope.run, &key).await?;
            if let Some(done) = events
                .iter()
                .find(|e| e.event_type == EventType::HarnessUnitCompleted.as_str())
            {
                report.skipped.push(u.name.clone());
                report.outputs.push((
                    u.name.clone(),
                    done.payload.get("output").cloned().unwrap_or(Value::Null),
                ));
                continue;
            }
            let progress = runs::get_artifact(self.kernel.db(), scope.run, &progress_key(&u.name))
                .await?
                .map(|a| a.value);
            let ctx = UnitCtx {
                kernel: self.kernel.clone(),
                scope: scope.clone(),
                unit: u.name.clone(),
                progress,
            };
            self.kernel
                .record(
                    scope,
                    &key,
                    EventType::HarnessUnitStarted,
                    json!({"resumed_from_progress": ctx.progress.is_some()}),
                )
                .await?;
            let output = match (u.work)(ctx.clone()).await {
                Ok(v) => v,
                Err(e) => {
                    self.kernel
                        .record(
                            scope,
                            &key,
                            EventType::HarnessUnitFailed,
                            json!({"message": e.to_string()}),
                        )
                        .await?;
                    return Err(e);
                }
            };
            let verdict = match &u.check {
                Some(check) => check(ctx, output.clone()).await?,
                None => Ok(()),
            };
            if let Err(message) = verdict {
                self.kernel
                    .record(
                        scope,
                        &key,
                        EventType::HarnessUnitUnclean,
                        json!({"message": message}),
                    )
                    .await?;
                return Err(Error::UncleanState {
                    unit: u.name.clone(),
                    message,
                });
            }
            let ev = NewEvent::new(EventType::HarnessUnitCompleted, json!({"output": output}))
                .step(key)
                .idempotent();
            append_events(self.kernel.db(), scope.run, &[ev], scope.lease_token).await?;
            report.ran.push(u.name.clone());
            report.outputs.push((u.name.clone(), output));
        }
        Ok(report)
    }
}
