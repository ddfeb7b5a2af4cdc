//! Subscribing to run-state notifications and following one run's ledger.
//!
//! A client subscribes to `RunStateChanged` (every run created or changing state, delivered via
//! PostgreSQL NOTIFY) and follows one run's hash-chained ledger with
//! `pgcrew::runs::subscribe_run`, a gap-free stream of its new events. Meanwhile three runs are
//! created and driven through their lifecycle: one is started and completed, one is cancelled
//! while pending, one is cancelled while running. Notifications are only wake-ups: the stream
//! re-reads the ledger table, so nothing is lost if a notification is.
//!
//! `cargo run --example run_notifications` (uses DATABASE_URL, or a throwaway local PostgreSQL).

use std::time::Duration;

use futures_util::StreamExt;
use pgcrew::runs::{self, LimitPolicy, NewRun, RunOutcome};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Client, ClientConfig, Event, EventKind};

#[tokio::main]
async fn main() -> pgcrew::Result<()> {
    let (dsn, _cluster) = pgcrew::db::database_url_or_throwaway().await?;
    let config = ClientConfig::builder()
        .heartbeat_interval(Duration::from_secs(1))
        .migrate(true)
        .build()?;
    let client = Client::builder(dsn.as_str()).config(config).build().await?;
    client.start().await?;
    if !client
        .notifier()
        .wait_connected(Duration::from_secs(5))
        .await
    {
        println!("(LISTEN connection not up yet: falling back to polling)");
    }
    let db = client.db().clone();

    let tenant = TenantContext::new("acme")?;
    tenancy::upsert(&db, &tenant).await?;
    let tenant = tenant.tenant_id;

    // Every run-state change, as it happens. The notification carries the run id only (any
    // role can LISTEN, so states stay out of payloads): re-read the run for its state.
    let mut states = client.subscribe(&[EventKind::RunStateChanged]);
    let state_db = db.clone();
    let printer = tokio::spawn(async move {
        while let Some(event) = states.recv().await {
            if let Event::RunStateChanged { run_id, .. } = event {
                match runs::get_run(&state_db, run_id).await {
                    Ok(run) => println!("  [state]  run {run_id}: now {}", run.state),
                    Err(e) => println!("  [state]  run {run_id}: cannot re-read ({e})"),
                }
            }
        }
    });

    // Run 1: created, started, completed, with its ledger followed live.
    let run1 = runs::create_run(&db, NewRun::new(tenant.clone()).agent("summarizer")).await?;
    println!("created run {run1} (followed)");
    let mut ledger = Box::pin(runs::subscribe_run(
        db.clone(),
        client.notifier(),
        run1,
        0,
        Duration::from_secs(5),
    ));
    let follower = tokio::spawn(async move {
        while let Some(event) = ledger.next().await {
            match event {
                Ok(ev) => {
                    println!(
                        "  [ledger] run {} seq {}: {} {}",
                        ev.run_id, ev.seq, ev.event_type, ev.payload
                    );
                    if ev.event_type == "run_completed" {
                        break;
                    }
                }
                Err(e) => println!("  [ledger] read error (the stream retries): {e}"),
            }
        }
    });

    runs::start_run(
        &db,
        run1,
        Some(client.instance_id()),
        None,
        LimitPolicy::Reject,
    )
    .await?;
    println!("started run {run1}");
    runs::append_event(
        &db,
        run1,
        runs::NewEvent::new("note", serde_json::json!({"text": "halfway there"})),
        None,
    )
    .await?;
    let outcome = RunOutcome {
        response_text: Some("done".into()),
        stop_reason: Some("end_turn".into()),
        ..RunOutcome::default()
    };
    runs::complete_run(&db, run1, outcome, None).await?;
    println!("completed run {run1}");

    // Run 2: cancelled before it ever started.
    let run2 = runs::create_run(&db, NewRun::new(tenant.clone())).await?;
    println!("created run {run2}");
    runs::cancel_run(&db, run2, "no longer needed").await?;
    println!("cancelled run {run2} while pending");

    // Run 3: cancelled while running (the instance working on it would see it at once).
    let run3 = runs::create_run(&db, NewRun::new(tenant.clone())).await?;
    println!("created run {run3}");
    runs::start_run(
        &db,
        run3,
        Some(client.instance_id()),
        None,
        LimitPolicy::Reject,
    )
    .await?;
    println!("started run {run3}");
    runs::cancel_run(&db, run3, "user pressed stop").await?;
    println!("cancelled run {run3} while running");

    // The followed run's stream ends at run_completed; give the state notifications a moment.
    if tokio::time::timeout(Duration::from_secs(10), follower)
        .await
        .is_err()
    {
        println!("(the ledger stream did not reach run_completed within 10 s)");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    printer.abort();

    for run in [run1, run2, run3] {
        let r = runs::get_run(&db, run).await?;
        let chain = runs::verify_run_chain(&db, run).await?;
        println!(
            "run {run}: state {}, ledger chain valid: {}",
            r.state.as_str(),
            chain.valid
        );
    }
    client.stop().await?;
    println!("client stopped");
    Ok(())
}
