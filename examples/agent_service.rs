//! An agent service from one builder: the agent, its tool, the model and the service's own
//! task queue are each said once; `build()` registers them, `start()` hosts them, `submit` and
//! `wait_for_run` drive a run, `stop()` drains.
//!
//! `cargo run --example agent_service` (uses DATABASE_URL, or a throwaway local PostgreSQL).
//! The model is the offline scripted demo model unless OPENAI_API_KEY or OPENAI_BASE_URL is set.

use std::sync::Arc;
use std::time::Duration;

use pgcrew::agent::{AgentDef, Tool};
use pgcrew::model::{ModelPort, OpenAiModel, ScriptedModel};
use pgcrew::queue::{TaskOutcome, WorkerPool};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Client, ClientConfig, NewTask};
use serde_json::{Value, json};

/// The payload of a `send_email` task.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SendEmail {
    to: String,
    subject: String,
}

/// A tool the agent may call.
fn lookup_customer() -> pgcrew::Result<Tool> {
    Tool::builder("lookup_customer")
        .description("Look a customer up by id: plan and customer since")
        .input_schema(json!({
            "type": "object",
            "properties": {"customer_id": {"type": "string"}},
            "required": ["customer_id"]
        }))
        .handler(|_ctx, args: Value| async move {
            // Call your own systems here; use `_ctx.idempotency_key` for side effects.
            Ok(json!({"customer_id": args["customer_id"], "plan": "pro", "since": 2021}))
        })
        .build()
}

/// A real model when one is configured, else the deterministic offline one.
fn model() -> pgcrew::Result<Arc<dyn ModelPort>> {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    if set("OPENAI_API_KEY") || set("OPENAI_BASE_URL") {
        Ok(Arc::new(OpenAiModel::from_env()?))
    } else {
        Ok(Arc::new(ScriptedModel::demo_agent()))
    }
}

#[tokio::main]
async fn main() -> pgcrew::Result<()> {
    let (dsn, _cluster) = pgcrew::db::database_url_or_throwaway().await?;
    let client = Client::builder(dsn)
        .config(ClientConfig::builder().migrate(true).build()?)
        .agent(
            AgentDef::new("assistant", "gpt-4o-mini")
                .system_prompt("You are a helpful assistant. Use lookup_customer for customers.")
                .tool("lookup_customer")
                .max_tokens(300)
                .max_iterations(5),
        )
        .tool(lookup_customer()?)
        .model(model()?)
        // The service's own queue and handler, on the same pool as the agent runs.
        .worker_pool(
            WorkerPool::builder()
                .queue("emails")
                .concurrency(8)
                .handler("send_email", |_ctx, email: SendEmail| async move {
                    println!("sending {:?} to {}", email.subject, email.to);
                    Ok(TaskOutcome::Complete)
                }),
        )
        .build()
        .await?;
    client.start().await?;
    println!("instance {} hosts agent assistant", client.instance_id());

    let acme = TenantContext::new("acme")?.budget_usd(Some(1.0));
    tenancy::upsert(client.db(), &acme).await?;
    // Any instance hosting `assistant` runs it; from SQL: SELECT pgcrew.submit_run(...).
    let run = client
        .submit(
            "assistant",
            &acme.tenant_id,
            "user-1",
            "What plan is customer C-42 on?",
        )
        .await?;
    let done = client.wait_for_run(run, Duration::from_secs(60)).await?;
    println!(
        "run {run} {}: {}",
        done.state,
        done.response_text
            .or(done.error_message)
            .unwrap_or_default()
    );
    let email = SendEmail {
        to: "ops@example.com".into(),
        subject: "run finished".into(),
    };
    let task = NewTask::new("send_email", &email)?
        .queue("emails")
        .tenant(acme.tenant_id.clone());
    client.enqueue(&task).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.stop().await?; // drains the pool: the email task finishes first
    Ok(())
}
