//! Tool steps: two-phase durable tool calls (`tool_requested`, then `tool_completed` /
//! `tool_failed` / `tool_outcome_unknown`) with checks before anything is recorded
//! (`tool_rejected`, `capability_denied`) and reconciliation of unknown outcomes.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::instrument;

use super::tool::{Tool, ToolContext, ToolError};
use super::{Kernel, RunScope, StepEvent, validate_step_key};
use crate::error::{Error, Result};
use crate::ids::RunId;
use crate::runs::{NewEvent, append_events};
use crate::tenancy;
use crate::vocab::EventType;

/// The result of [`Kernel::step_tool`] / [`Kernel::reconcile_tool`].
#[derive(Debug, Clone, PartialEq)]
pub struct ToolStep {
    /// The tool's output.
    pub output: Value,
    /// True when the output came from the ledger (the tool did not run).
    pub replayed: bool,
    /// True when the output was obtained by reconciliation.
    pub reconciled: bool,
    /// The idempotency key the tool was given.
    pub idempotency_key: String,
}

impl Kernel {
    /// The stable idempotency key of a tool step: the same for every attempt of `(run, step_key)`.
    pub fn idempotency_key(run: RunId, step_key: &str) -> String {
        let digest = Sha256::digest(format!("{run}\0{step_key}").as_bytes());
        format!("pgcrew-{}", &hex::encode(digest)[..32])
    }

    /// A durable tool call keyed by `(run, step_key)`, two-phase: `tool_requested` is recorded
    /// before the call and `tool_completed` / `tool_failed` after it.
    ///
    /// Before recording anything the tool must be registered ([`Error::NotFound`], recorded as
    /// `tool_rejected`), the arguments must match its input schema ([`Error::InvalidInput`],
    /// `tool_rejected`) and the tenant must hold its capability ([`Error::CapabilityDenied`],
    /// `capability_denied`); the tool does not run in those cases.
    ///
    /// A recorded completion is returned without running the tool; a recorded failure is
    /// returned as [`Error::ToolFailed`]. A handler returning [`ToolError::UnknownOutcome`], or
    /// a `tool_requested` with no outcome (a crash during the call), makes the step fail with
    /// [`Error::ToolOutcomeUnknown`] until [`reconcile_tool`](Self::reconcile_tool) settles it.
    #[instrument(skip(self, arguments), fields(run = %scope.run, step_key, tool), err)]
    pub async fn step_tool(
        &self,
        scope: &RunScope,
        step_key: &str,
        tool: &str,
        arguments: Value,
    ) -> Result<ToolStep> {
        validate_step_key(step_key)?;
        let key = Self::idempotency_key(scope.run, step_key);
        let events = self.step_events(scope.run, step_key).await?;
        if let Some(out) = recorded_outcome(&events, tool, &key)? {
            return Ok(out);
        }
        if events
            .iter()
            .any(|e| e.event_type == EventType::ToolRequested.as_str())
        {
            return Err(Error::ToolOutcomeUnknown {
                tool: tool.to_string(),
                step_key: step_key.to_string(),
            });
        }
        let t = self.check_tool(scope, step_key, tool, &arguments).await?;
        let ev = NewEvent::new(
            EventType::ToolRequested,
            json!({"tool": tool, "arguments": arguments, "idempotency_key": key}),
        )
        .step(step_key)
        .idempotent();
        let appended = append_events(&self.db, scope.run, &[ev], scope.lease_token).await?;
        if appended.first().is_some_and(|a| !a.inserted) {
            // A concurrent attempt requested this call first: its outcome is not ours to know.
            return Err(Error::ToolOutcomeUnknown {
                tool: tool.to_string(),
                step_key: step_key.to_string(),
            });
        }
        self.invoke(scope, step_key, &t, arguments, key, false)
            .await
    }

    /// Settle a tool step whose outcome is unknown: call the tool again with the same arguments
    /// and idempotency key and `reconciliation = true`, and record the outcome. A step that
    /// already has a recorded completion returns it without running the tool.
    #[instrument(skip(self), fields(run = %scope.run, step_key), err)]
    pub async fn reconcile_tool(&self, scope: &RunScope, step_key: &str) -> Result<ToolStep> {
        validate_step_key(step_key)?;
        let key = Self::idempotency_key(scope.run, step_key);
        let events = self.step_events(scope.run, step_key).await?;
        let Some(req) = events
            .iter()
            .find(|e| e.event_type == EventType::ToolRequested.as_str())
        else {
            return Err(Error::invalid(
                "step_key",
                format!(
                    "step `{step_key}` of run {} has no recorded tool call to reconcile",
                    scope.run
                ),
            ));
        };
        let tool = req.text("tool");
        if let Some(out) = recorded_outcome(&events, &tool, &key)? {
            return Ok(out);
        }
        let arguments = req.payload.get("arguments").cloned().unwrap_or(Value::Null);
        let t = self.check_tool(scope, step_key, &tool, &arguments).await?;
        self.invoke(scope, step_key, &t, arguments, key, true).await
    }

    async fn check_tool(
        &self,
        scope: &RunScope,
        step_key: &str,
        tool: &str,
        arguments: &Value,
    ) -> Result<Tool> {
        let Some(t) = self.tools.get(tool) else {
            let known = self.tools.names();
            self.record(
                scope,
                step_key,
                EventType::ToolRejected,
                json!({"tool": tool, "reason": "unknown_tool",
                       "message": format!("no tool named `{tool}` is registered on this instance (registered: {known:?})")}),
            )
            .await?;
            return Err(Error::not_found("tool", tool));
        };
        if let Err(e) = t.validate_arguments(arguments) {
            self.record(
                scope,
                step_key,
                EventType::ToolRejected,
                json!({"tool": tool, "reason": "invalid_arguments", "arguments": arguments,
                       "message": e.to_string()}),
            )
            .await?;
            return Err(e);
        }
        if let Err(e) =
            tenancy::require_capability(&self.db, &scope.tenant, tool, t.requires_capability())
                .await
        {
            if matches!(e, Error::CapabilityDenied { .. }) {
                self.record(
                    scope,
                    step_key,
                    EventType::CapabilityDenied,
                    json!({"tool": tool, "capability": t.requires_capability(),
                           "message": e.to_string()}),
                )
                .await?;
            }
            return Err(e);
        }
        Ok(t.clone())
    }

    async fn invoke(
        &self,
        scope: &RunScope,
        step_key: &str,
        t: &Tool,
        arguments: Value,
        key: String,
        reconciliation: bool,
    ) -> Result<ToolStep> {
        let ctx = ToolContext {
            run: scope.run,
            tenant: scope.tenant.clone(),
            step_key: step_key.to_string(),
            idempotency_key: key.clone(),
            reconciliation,
        };
        let called = t.call(ctx, arguments).await;
        crate::telemetry::global().tool_call(
            t.name(),
            match &called {
                Ok(_) => "ok",
                Err(ToolError::Failed(_)) => "failed",
                Err(ToolError::UnknownOutcome(_)) => "unknown",
            },
        );
        match called {
            Ok(output) => {
                let ev = NewEvent::new(
                    EventType::ToolCompleted,
                    json!({"tool": t.name(), "output": output, "reconciled": reconciliation}),
                )
                .step(step_key)
                .idempotent();
                let appended = append_events(&self.db, scope.run, &[ev], scope.lease_token).await?;
                if appended.first().is_some_and(|a| !a.inserted) {
                    // A concurrent attempt recorded first: its outcome stands.
                    let events = self.step_events(scope.run, step_key).await?;
                    if let Some(out) = recorded_outcome(&events, t.name(), &key)? {
                        return Ok(out);
                    }
                }
                Ok(ToolStep {
                    output,
                    replayed: false,
                    reconciled: reconciliation,
                    idempotency_key: key,
                })
            }
            Err(e) => {
                let tool = t.name().to_string();
                let (event_type, message, error) = match e {
                    ToolError::Failed(message) => (
                        EventType::ToolFailed,
                        message.clone(),
                        Error::ToolFailed { tool, message },
                    ),
                    ToolError::UnknownOutcome(message) => (
                        EventType::ToolOutcomeUnknown,
                        message,
                        Error::ToolOutcomeUnknown {
                            tool,
                            step_key: step_key.to_string(),
                        },
                    ),
                };
                self.record(
                    scope,
                    step_key,
                    event_type,
                    json!({"tool": t.name(), "message": message, "reconciled": reconciliation}),
                )
                .await?;
                Err(error)
            }
        }
    }
}

/// The recorded definitive outcome of a tool step, if any: `Ok(Some)` for a completion,
/// `Err(ToolFailed)` for a failure.
fn recorded_outcome(events: &[StepEvent], tool: &str, key: &str) -> Result<Option<ToolStep>> {
    for e in events.iter().rev() {
        match EventType::from_name(&e.event_type) {
            Some(EventType::ToolCompleted) => {
                return Ok(Some(ToolStep {
                    output: e.payload.get("output").cloned().unwrap_or(Value::Null),
                    replayed: true,
                    reconciled: e
                        .payload
                        .get("reconciled")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    idempotency_key: key.to_string(),
                }));
            }
            Some(EventType::ToolFailed) => {
                return Err(Error::ToolFailed {
                    tool: tool.to_string(),
                    message: e
                        .payload
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("failed")
                        .to_string(),
                });
            }
            _ => {}
        }
    }
    Ok(None)
}
