//! Replaying a recorded model step when the request has changed ("drift").
//!
//! A model step is recorded once with the offline `ScriptedModel` (the ledger keeps the
//! request's fingerprint and the output). The same step is then replayed with a changed prompt
//! under the three replay policies:
//!
//! * `Strict`: the call fails with `Error::ReplayConsistency` (and `replay_rejected` is
//!   recorded); the model is not called.
//! * `AllowPromptDrift`: the recorded output is returned and `replayed_with_drift` is recorded;
//!   the model is not called.
//! * `ForkOnDrift`: a new run is forked from the original (carrying the events before the step,
//!   with `parent_run_id` and `forked_at_seq`) and the step executes there with the new prompt.
//!
//! Both ledgers are printed at the end.
//!
//! `cargo run --example replay_drift` (uses DATABASE_URL, or a throwaway local PostgreSQL).

use std::sync::Arc;
use std::time::Duration;

use pgcrew::kernel::{Kernel, ReplayPolicy, RunScope};
use pgcrew::model::{ModelRequest, ScriptedModel, ScriptedReply};
use pgcrew::runs::{self, NewRun};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Db, Error, RunId};

fn request(prompt: &str) -> ModelRequest {
    ModelRequest::new("gpt-4o-mini")
        .system("Answer in one word.")
        .user(prompt)
        .max_tokens(20)
        .temperature(0.0)
}

async fn print_ledger(db: &Db, run: RunId) -> pgcrew::Result<()> {
    let r = runs::get_run(db, run).await?;
    let parent = r
        .parent_run_id
        .map(|p| format!(", forked from {p} at seq {}", r.forked_at_seq.unwrap_or(0)))
        .unwrap_or_default();
    println!("ledger of run {run}{parent}:");
    for ev in runs::read_events(db, run, 0, 1000).await? {
        let mut payload = ev.payload.to_string();
        if payload.len() > 110 {
            let mut cut = 107;
            while !payload.is_char_boundary(cut) {
                cut -= 1;
            }
            payload.truncate(cut);
            payload.push_str("...");
        }
        println!(
            "  {:>2} {:<20} step={:<4} {payload}",
            ev.seq,
            ev.event_type,
            ev.step_key.as_deref().unwrap_or("-")
        );
    }
    println!(
        "  chain valid: {}",
        runs::verify_run_chain(db, run).await?.valid
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (dsn, _cluster) = pgcrew::db::database_url_or_throwaway().await?;
    let db = Db::connect(&dsn, 4, Duration::from_secs(10)).await?;
    db.migrate().await?;

    let tenant = TenantContext::new("acme")?.budget_usd(Some(1.0));
    tenancy::upsert(&db, &tenant).await?;
    let run = runs::create_run(&db, NewRun::new(tenant.tenant_id.clone())).await?;
    let scope = RunScope::new(run, tenant.tenant_id.clone());

    // The offline scripted model: a pure function of the request (it also counts its calls).
    let model = Arc::new(ScriptedModel::from_fn(|req| {
        let prompt = req.last_user_text().unwrap_or_default();
        let answer = if prompt.contains("French") {
            "rouge"
        } else {
            "red"
        };
        ScriptedModel::reply(req, &ScriptedReply::text(answer))
    }));
    let kernel = Kernel::new(db.clone(), model.clone());

    let original = request("Name a primary colour.");
    let first = kernel
        .step_model(&scope, "ask", &original, ReplayPolicy::Strict)
        .await?;
    println!(
        "recorded step `ask`: {:?} (cost ${:.6}, model calls so far: {})",
        first.response.content_text(),
        first.cost_usd,
        model.calls()
    );

    let again = kernel
        .step_model(&scope, "ask", &original, ReplayPolicy::Strict)
        .await?;
    println!(
        "same request again: replayed = {}, drift = {}, model calls: {}",
        again.replayed,
        again.drift,
        model.calls()
    );

    let changed = request("Name a primary colour, in French.");

    match kernel
        .step_model(&scope, "ask", &changed, ReplayPolicy::Strict)
        .await
    {
        Err(e @ Error::ReplayConsistency { .. }) => println!("Strict: rejected: {e}"),
        Err(e) => return Err(e.into()),
        Ok(s) => return Err(format!("Strict unexpectedly accepted the drift: {s:?}").into()),
    }
    println!("  model calls: {}", model.calls());

    let drifted = kernel
        .step_model(&scope, "ask", &changed, ReplayPolicy::AllowPromptDrift)
        .await?;
    println!(
        "AllowPromptDrift: recorded output {:?}, replayed = {}, drift = {}, model calls: {}",
        drifted.response.content_text(),
        drifted.replayed,
        drifted.drift,
        model.calls()
    );

    let forked = kernel
        .step_model(&scope, "ask", &changed, ReplayPolicy::ForkOnDrift)
        .await?;
    println!(
        "ForkOnDrift: executed in new run {} (forked from {}), output {:?}, model calls: {}",
        forked.run,
        forked
            .forked_from
            .map(|p| p.to_string())
            .unwrap_or_default(),
        forked.response.content_text(),
        model.calls()
    );

    println!();
    print_ledger(&db, run).await?;
    print_ledger(&db, forked.run).await?;
    let spent = tenancy::get(&db, &tenant.tenant_id).await?.spent_usd;
    println!(
        "tenant {} spent ${spent:.6} on {} model calls",
        tenant.tenant_id,
        model.calls()
    );
    Ok(())
}
