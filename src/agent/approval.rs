//! Human approval of tool calls.
//!
//! A tool built with [`ToolBuilder::requires_approval`](crate::kernel::ToolBuilder::requires_approval)
//! is not called when the model asks for it: the agent run first waits durably (see
//! [`crate::kernel::wait`]) for the signal `approval/<step key>` of the call's tool step
//! (`iter-<n>/tool-<call id>`, shown in the `wait_started` event with the tool's name and
//! arguments). The run is parked meanwhile (`waiting`: no worker, lease or connection held).
//!
//! Decide it from anywhere: `pgcrew run approve|reject RUN STEP [--by WHO] [--reason R]`,
//! `pgcrew.decide_approval(run, step, approved, by, reason)` in SQL, or
//! [`crate::runs::approve_step`] / [`crate::runs::reject_step`]; deciding a step that is not
//! waiting for approval is refused ([`Error::NotWaiting`](crate::Error::NotWaiting)). The run
//! resumes on any instance and records `approval_decided` {tool, decision, by, reason}:
//! approved, the tool runs; rejected (or undecided when the tool's approval timeout passes), the
//! tool is not called and the model receives the rejection as the call's result.

use serde_json::{Value, json};

use crate::error::Result;
use crate::kernel::{Kernel, RunScope, WaitOutcome};
use crate::model::ToolCall;
use crate::runs::{NewEvent, append_events};
use crate::vocab::EventType;

/// The signal name an approval of tool step `step_key` waits for.
pub fn approval_signal(step_key: &str) -> String {
    format!("approval/{step_key}")
}

/// Gate the tool call `call` of tool step `step_key`: `Ok(None)` when the tool needs no approval
/// or was approved, `Ok(Some(result))` with the rejection to return to the model instead of
/// calling the tool, [`Error::Waiting`](crate::Error::Waiting) while the decision is pending (the
/// run is parked). Replays return the recorded decision.
pub(crate) async fn gate(
    kernel: &Kernel,
    scope: &RunScope,
    step_key: &str,
    call: &ToolCall,
) -> Result<Option<String>> {
    let Some(timeout) = kernel
        .tools()
        .get(&call.name)
        .and_then(|t| t.approval_timeout())
    else {
        return Ok(None);
    };
    let key = format!("{step_key}/approval");
    let recorded = kernel
        .step_events(scope.run, &key)
        .await?
        .into_iter()
        .find(|e| e.event_type == EventType::ApprovalDecided.as_str())
        .map(|e| e.payload);
    let decided = match recorded {
        Some(p) => p,
        None => {
            let details = json!({
                "tool": call.name,
                "call_id": call.id,
                "arguments": call.arguments,
                "step": step_key,
            });
            let signal = approval_signal(step_key);
            let decision = match kernel
                .wait_step(scope, &key, &signal, timeout, details)
                .await?
            {
                WaitOutcome::Signal(p) => json!({
                    "tool": call.name,
                    "step": step_key,
                    "decision": p.get("decision").cloned().unwrap_or(Value::Null),
                    "by": p.get("by").cloned().unwrap_or(Value::Null),
                    "reason": p.get("reason").cloned().unwrap_or(Value::Null),
                }),
                WaitOutcome::TimedOut => json!({
                    "tool": call.name,
                    "step": step_key,
                    "decision": "timed_out",
                    "by": Value::Null,
                    "reason": format!("no decision within {timeout:?}"),
                }),
            };
            let ev = NewEvent::new(EventType::ApprovalDecided, decision.clone())
                .step(key)
                .idempotent();
            append_events(kernel.db(), scope.run, &[ev], scope.lease_token).await?;
            decision
        }
    };
    if decided.get("decision").and_then(Value::as_str) == Some("approved") {
        return Ok(None);
    }
    let by = decided
        .get("by")
        .and_then(Value::as_str)
        .unwrap_or("nobody");
    let reason = decided
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("no reason given");
    Ok(Some(
        json!({
            "error": format!("the call of tool `{}` was not approved ({by}: {reason}); it was not run", call.name),
            "rejected": true,
            "decision": decided.get("decision").cloned().unwrap_or(Value::Null),
            "by": decided.get("by").cloned().unwrap_or(Value::Null),
            "reason": decided.get("reason").cloned().unwrap_or(Value::Null),
        })
        .to_string(),
    ))
}
