//! Built-in demo agents, tools and task kinds, used by `pgcrew serve --agents demo`,
//! `pgcrew demo` and the examples. Everything is deterministic and offline, with a little
//! simulated latency so that runs take a visible moment.
//!
//! - Tools: [`LOOKUP_ORDER`] (no capability), [`GET_WEATHER`] (no capability) and
//!   [`CHARGE_CREDIT_CARD`] (requires `payments:charge`; the charge id is derived from the
//!   step's idempotency key, so a repeated or reconciled call returns the same charge).
//!   [`ISSUE_REFUND`] (requires a human approval before each call: see
//!   [`crate::agent::approval`]).
//! - Agents ([`demo_agents`]): `support` (orders and weather), `billing` (orders and
//!   charges) and `refunds` (orders and approved refunds), all on `gpt-4o-mini` by default.
//! - Task kinds ([`install_demo_tasks`]): [`DEMO_SLEEP`] (sleeps the payload's `ms`) and
//!   [`DEMO_NOOP`].

use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::queue::{TaskOutcome, WorkerPoolBuilder};

use super::runtime::AgentDef;
use super::tool::{Tool, ToolContext, ToolError, ToolRegistry};

/// Tool: look an order up (no capability needed).
pub const LOOKUP_ORDER: &str = "lookup_order";
/// Tool: the weather in a city (no capability needed).
pub const GET_WEATHER: &str = "get_weather";
/// Tool: charge a card (requires [`PAYMENTS_CHARGE`]).
pub const CHARGE_CREDIT_CARD: &str = "charge_credit_card";
/// The capability [`CHARGE_CREDIT_CARD`] requires.
pub const PAYMENTS_CHARGE: &str = "payments:charge";
/// Tool: refund an order (each call waits for a human approval).
pub const ISSUE_REFUND: &str = "issue_refund";
/// The demo refunds agent (tools: [`LOOKUP_ORDER`], [`ISSUE_REFUND`]).
pub const REFUNDS_AGENT: &str = "refunds";
/// The demo support agent (tools: [`LOOKUP_ORDER`], [`GET_WEATHER`]).
pub const SUPPORT_AGENT: &str = "support";
/// The demo billing agent (tools: [`LOOKUP_ORDER`], [`CHARGE_CREDIT_CARD`]).
pub const BILLING_AGENT: &str = "billing";
/// The default model of the demo agents (it has a built-in price).
pub const DEMO_MODEL: &str = "gpt-4o-mini";
/// Task kind: sleep `{"ms": N}` milliseconds (at most 60 000).
pub const DEMO_SLEEP: &str = "demo.sleep";
/// Task kind: do nothing.
pub const DEMO_NOOP: &str = "demo.noop";
/// Default simulated latency of every demo tool call.
pub const DEFAULT_TOOL_LATENCY: Duration = Duration::from_millis(150);

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text_arg<'a>(args: &'a Value, key: &str) -> std::result::Result<&'a str, ToolError> {
    args.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ToolError::Failed(format!("`{key}` must be a non-empty string")))
}

/// The result of [`LOOKUP_ORDER`] for `order_id` (a pure function of the id).
pub fn lookup_order_result(order_id: &str) -> Value {
    let d = digest(&["order", order_id]);
    let statuses = ["processing", "shipped", "delivered"];
    let status = statuses[usize::from(d[0]) % statuses.len()];
    let items = 1 + u64::from(d[1] % 4);
    let total_cents = 500 + u64::from(u16::from_be_bytes([d[2], d[3]]) % 20_000);
    json!({
        "order_id": order_id,
        "status": status,
        "items": items,
        "total_usd": total_cents as f64 / 100.0,
    })
}

/// The result of [`GET_WEATHER`] for `city` (a pure function of the name).
pub fn weather_result(city: &str) -> Value {
    let d = digest(&["weather", &city.to_lowercase()]);
    let forecasts = ["sunny", "cloudy", "rain", "windy", "snow"];
    json!({
        "city": city,
        "forecast": forecasts[usize::from(d[0]) % forecasts.len()],
        "temperature_c": i64::from(d[1] % 35) - 5,
    })
}

/// The charge id [`CHARGE_CREDIT_CARD`] returns for an idempotency key: the same key always
/// gives the same charge (like a payment provider honouring `Idempotency-Key`).
pub fn charge_id_for(idempotency_key: &str) -> String {
    format!("ch_{}", &hex(&digest(&["charge", idempotency_key]))[..16])
}

/// A demo tool taking one required string argument `(name, description)`: it sleeps `latency`,
/// then answers `answer(argument)`.
fn text_arg_tool(
    tool: &str,
    description: &str,
    (arg, arg_description): (&'static str, &str),
    latency: Duration,
    answer: fn(&str) -> Value,
) -> Result<Tool> {
    Tool::builder(tool)
        .description(description)
        .input_schema(json!({
            "type": "object",
            "properties": {arg: {"type": "string", "description": arg_description}},
            "required": [arg],
            "additionalProperties": false
        }))
        .handler(move |_ctx: ToolContext, args: Value| async move {
            tokio::time::sleep(latency).await;
            Ok(answer(text_arg(&args, arg)?))
        })
        .build()
}

/// The demo tools, each sleeping `latency` before answering.
pub fn demo_tools(latency: Duration) -> Result<ToolRegistry> {
    let lookup = text_arg_tool(
        LOOKUP_ORDER,
        "Look up an order by id: status, number of items, total",
        ("order_id", "the order id"),
        latency,
        lookup_order_result,
    )?;
    let weather = text_arg_tool(
        GET_WEATHER,
        "The current weather in a city",
        ("city", "the city"),
        latency,
        weather_result,
    )?;
    let charge = Tool::builder(CHARGE_CREDIT_CARD)
        .description("Charge the customer's card on file (idempotent per step)")
        .input_schema(json!({
            "type": "object",
            "properties": {
                "customer": {"type": "string", "description": "the customer id"},
                "amount_usd": {"type": "number", "minimum": 0.01, "maximum": 10000}
            },
            "required": ["customer", "amount_usd"],
            "additionalProperties": false
        }))
        .requires_capability(PAYMENTS_CHARGE)
        .handler(move |ctx: ToolContext, args: Value| async move {
            tokio::time::sleep(latency).await;
            let customer = text_arg(&args, "customer")?.to_string();
            let amount = args
                .get("amount_usd")
                .and_then(Value::as_f64)
                .filter(|a| a.is_finite() && *a > 0.0)
                .ok_or_else(|| ToolError::Failed("`amount_usd` must be positive".into()))?;
            Ok(json!({
                "charge_id": charge_id_for(&ctx.idempotency_key),
                "customer": customer,
                "amount_usd": amount,
                "status": "succeeded",
                "reconciled": ctx.reconciliation,
            }))
        })
        .build()?;
    let refund = Tool::builder(ISSUE_REFUND)
        .description("Refund an order in full (a human approves each refund first)")
        .input_schema(json!({
            "type": "object",
            "properties": {"order_id": {"type": "string", "description": "the order id"}},
            "required": ["order_id"],
            "additionalProperties": false
        }))
        .requires_approval()
        .handler(move |ctx: ToolContext, args: Value| async move {
            tokio::time::sleep(latency).await;
            let order = text_arg(&args, "order_id")?.to_string();
            Ok(json!({
                "refund_id": format!("re_{}", &hex(&digest(&["refund", &ctx.idempotency_key]))[..16]),
                "order_id": order,
                "status": "refunded",
            }))
        })
        .build()?;
    ToolRegistry::new()
        .with(lookup)?
        .with(weather)?
        .with(charge)?
        .with(refund)
}

/// The demo agents on `model` (use [`DEMO_MODEL`] unless an OpenAI-compatible server serves
/// another model).
pub fn demo_agents(model: &str) -> Vec<AgentDef> {
    vec![
        AgentDef::new(SUPPORT_AGENT, model)
            .description("Answers customer questions about orders and delivery weather")
            .system_prompt(
                "You are a support agent. Use lookup_order for order questions and \
                 get_weather for delivery weather, then answer in one short paragraph.",
            )
            .tool(LOOKUP_ORDER)
            .tool(GET_WEATHER)
            .max_tokens(300)
            .temperature(0.0)
            .max_iterations(4),
        AgentDef::new(BILLING_AGENT, model)
            .description("Looks up an order and charges the customer for it")
            .system_prompt(
                "You are a billing agent. Look the order up with lookup_order, charge its \
                 total with charge_credit_card, then confirm in one sentence.",
            )
            .tool(LOOKUP_ORDER)
            .tool(CHARGE_CREDIT_CARD)
            .max_tokens(300)
            .temperature(0.0)
            .max_iterations(4),
        AgentDef::new(REFUNDS_AGENT, model)
            .description("Refunds orders once a human approves each refund")
            .system_prompt(
                "You are a refunds agent. Refund the order with issue_refund (a human approves \
                 it first), then confirm in one sentence.",
            )
            .tool(LOOKUP_ORDER)
            .tool(ISSUE_REFUND)
            .max_tokens(300)
            .temperature(0.0)
            .max_iterations(4),
    ]
}

/// The payload of a [`DEMO_SLEEP`] task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SleepPayload {
    /// Milliseconds to sleep (capped at 60 000).
    pub ms: u64,
}

/// Register the [`DEMO_SLEEP`] and [`DEMO_NOOP`] handlers on a worker pool builder.
pub fn install_demo_tasks(builder: WorkerPoolBuilder) -> WorkerPoolBuilder {
    builder
        .handler(DEMO_SLEEP, |ctx, p: SleepPayload| async move {
            let d = Duration::from_millis(p.ms.min(60_000));
            tokio::select! {
                _ = tokio::time::sleep(d) => Ok(TaskOutcome::Complete),
                _ = ctx.cancel.cancelled() => Ok(TaskOutcome::Snooze(Duration::from_millis(100))),
            }
        })
        .handler(DEMO_NOOP, |_ctx, _p: Value| async move {
            Ok(TaskOutcome::Complete)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_deterministic() {
        assert_eq!(lookup_order_result("A-1"), lookup_order_result("A-1"));
        assert_eq!(
            weather_result("Oslo")["forecast"],
            weather_result("oslo")["forecast"]
        );
        assert_eq!(charge_id_for("k"), charge_id_for("k"));
        assert_ne!(charge_id_for("k"), charge_id_for("k2"));
    }

    #[test]
    fn tools_and_agents_are_valid() {
        let tools = demo_tools(Duration::ZERO).unwrap();
        assert_eq!(tools.names().len(), 4);
        assert!(tools.get(ISSUE_REFUND).unwrap().requires_approval());
        for a in demo_agents(DEMO_MODEL) {
            a.validate().unwrap();
            for t in &a.tools {
                assert!(tools.get(t).is_some(), "{t}");
            }
        }
        assert_eq!(
            tools.get(CHARGE_CREDIT_CARD).unwrap().requires_capability(),
            Some(PAYMENTS_CHARGE)
        );
    }
}
