//! A two-phase tool step with reconciliation: charging a card exactly once.
//!
//! `Kernel::step_tool` records `tool_requested` before calling a tool and `tool_completed`
//! after it. Here a fake payment provider charges the card but the response is "lost": the tool
//! returns `ToolError::UnknownOutcome`, the step is recorded as `tool_outcome_unknown`, and
//! every further `step_tool` for that step fails with `Error::ToolOutcomeUnknown` instead of
//! charging again. `Kernel::reconcile_tool` then calls the tool once more with the *same*
//! idempotency key and `reconciliation = true`; the provider recognises the key and returns the
//! original charge. From then on the step replays from the ledger without calling the tool.
//!
//! `cargo run --example two_phase_tool` (uses DATABASE_URL, or a throwaway local PostgreSQL).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgcrew::agent::{Tool, ToolError, ToolRegistry};
use pgcrew::kernel::{Kernel, RunScope};
use pgcrew::model::ScriptedModel;
use pgcrew::runs::{self, NewRun};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Db, Error};
use serde_json::json;

/// A fake payment provider that is idempotent by key (as real ones are).
#[derive(Default)]
struct Provider {
    /// idempotency key -> (charge id, amount in cents)
    charges: Mutex<BTreeMap<String, (String, i64)>>,
    calls: AtomicU64,
}

impl Provider {
    /// Charge once per key; a repeated key returns the existing charge.
    fn charge(&self, key: &str, amount_cents: i64) -> (String, i64) {
        let mut charges = self.charges.lock().unwrap_or_else(|e| e.into_inner());
        let next = format!("ch_{}", charges.len() + 1);
        charges
            .entry(key.to_string())
            .or_insert((next, amount_cents))
            .clone()
    }
}

fn payment_tool(provider: Arc<Provider>) -> pgcrew::Result<Tool> {
    Tool::builder("charge_credit_card")
        .description("Charges a credit card")
        .input_schema(json!({
            "type": "object",
            "properties": {
                "amount_cents": {"type": "integer", "minimum": 1},
                "card": {"type": "string", "minLength": 4}
            },
            "required": ["amount_cents", "card"],
            "additionalProperties": false
        }))
        .requires_capability("payments:charge")
        .handler(move |ctx, args| {
            let provider = provider.clone();
            async move {
                let call = provider.calls.fetch_add(1, Ordering::SeqCst) + 1;
                let amount = args["amount_cents"].as_i64().unwrap_or(0);
                println!(
                    "  provider call #{call}: key {}, reconciliation = {}",
                    ctx.idempotency_key, ctx.reconciliation
                );
                let (charge_id, amount) = provider.charge(&ctx.idempotency_key, amount);
                if call == 1 {
                    // The charge went through, but the response never arrived.
                    return Err(ToolError::UnknownOutcome(
                        "provider timed out after accepting the request".into(),
                    ));
                }
                Ok(json!({"charge_id": charge_id, "amount_cents": amount}))
            }
        })
        .build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (dsn, _cluster) = pgcrew::db::database_url_or_throwaway().await?;
    let db = Db::connect(&dsn, 4, Duration::from_secs(10)).await?;
    db.migrate().await?;

    let tenant = TenantContext::new("shop")?.capabilities(["payments:charge"]);
    tenancy::upsert(&db, &tenant).await?;
    let run = runs::create_run(&db, NewRun::new(tenant.tenant_id.clone())).await?;
    let scope = RunScope::new(run, tenant.tenant_id.clone());
    println!("run {run} for tenant {}", tenant.tenant_id);

    let provider = Arc::new(Provider::default());
    let tools = ToolRegistry::new().with(payment_tool(provider.clone())?)?;
    // This example makes no model calls; the kernel still needs a model port.
    let kernel =
        Kernel::new(db.clone(), Arc::new(ScriptedModel::sequence(vec![]))).with_tools(tools);
    let args = json!({"amount_cents": 1250, "card": "4242"});

    println!("1. step_tool(\"pay\"):");
    match kernel
        .step_tool(&scope, "pay", "charge_credit_card", args.clone())
        .await
    {
        Err(Error::ToolOutcomeUnknown { tool, step_key }) => {
            println!("   -> outcome unknown for {tool} (step {step_key}): needs reconciliation")
        }
        Err(e) => return Err(e.into()),
        Ok(step) => {
            return Err(
                format!("the step completed ({step:?}); expected an unknown outcome").into(),
            );
        }
    }

    println!("2. step_tool(\"pay\") again (e.g. after a restart):");
    match kernel
        .step_tool(&scope, "pay", "charge_credit_card", args.clone())
        .await
    {
        Err(e @ Error::ToolOutcomeUnknown { .. }) => {
            println!("   -> still refused, the card is not charged twice: {e}")
        }
        Err(e) => return Err(e.into()),
        Ok(step) => {
            return Err(
                format!("the step completed ({step:?}); expected an unknown outcome").into(),
            );
        }
    }

    println!("3. reconcile_tool(\"pay\"):");
    let settled = kernel.reconcile_tool(&scope, "pay").await?;
    println!(
        "   -> reconciled = {}, output {}, idempotency key {}",
        settled.reconciled, settled.output, settled.idempotency_key
    );

    println!("4. step_tool(\"pay\") once more:");
    let replay = kernel
        .step_tool(&scope, "pay", "charge_credit_card", args)
        .await?;
    println!(
        "   -> replayed from the ledger = {}, output {}",
        replay.replayed, replay.output
    );

    let charges = provider
        .charges
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len();
    println!(
        "provider: {} calls, {charges} charge(s); Kernel::idempotency_key(run, \"pay\") = {}",
        provider.calls.load(Ordering::SeqCst),
        Kernel::idempotency_key(run, "pay")
    );

    println!("ledger of run {run}:");
    for ev in runs::read_events(&db, run, 0, 1000).await? {
        println!(
            "  {:>2} {:<22} step={:<5} {}",
            ev.seq,
            ev.event_type,
            ev.step_key.as_deref().unwrap_or("-"),
            ev.payload
        );
    }
    println!(
        "chain valid: {}",
        runs::verify_run_chain(&db, run).await?.valid
    );
    Ok(())
}
