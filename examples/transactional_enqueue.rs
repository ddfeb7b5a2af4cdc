//! Enqueueing a task inside your own transaction, next to a business write.
//!
//! `queue::enqueue` takes any `db::Executor` (the pool, a connection, a transaction), so it can
//! run in the caller's open transaction: the task then exists exactly when the transaction
//! commits. The example writes an order row and
//! enqueues its `send_receipt` task in one transaction twice: the first transaction commits
//! (order and task exist, and a worker pool sends the receipt), the second rolls back (neither
//! the order nor the task exists, so no receipt is ever sent for an order that was never made).
//!
//! `cargo run --example transactional_enqueue` (uses DATABASE_URL, or a throwaway local
//! PostgreSQL).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgcrew::queue::{self, NewTask, TaskOutcome, TaskState, WorkerPool};
use pgcrew::{Client, ClientConfig, Error, TaskId};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct SendReceipt {
    order_id: i64,
    email: String,
}

/// Insert an order and enqueue its receipt in one transaction; commit or roll back.
async fn place_order(
    client: &Client,
    email: &str,
    amount_cents: i64,
    commit: bool,
) -> pgcrew::Result<(i64, TaskId)> {
    let mut conn = client.db().get().await?;
    let tx = conn.transaction().await?;
    let order_id: i64 = tx
        .query_one(
            "INSERT INTO shop_orders (email, amount_cents) VALUES ($1, $2) RETURNING id",
            &[&email, &amount_cents],
        )
        .await?
        .get(0);
    let receipt = SendReceipt {
        order_id,
        email: email.to_string(),
    };
    let task = queue::enqueue(&tx, &NewTask::new("send_receipt", &receipt)?).await?;
    println!(
        "  in the transaction: order {order_id} written, task {} enqueued ({})",
        task.id, task.state
    );
    if commit {
        tx.commit().await?;
        println!("  committed");
    } else {
        tx.rollback().await?;
        println!("  rolled back");
    }
    Ok((order_id, task.id))
}

/// Whether the order row exists.
async fn order_exists(db: &pgcrew::Db, id: i64) -> pgcrew::Result<bool> {
    let conn = db.get().await?;
    let n: i64 = conn
        .query_one("SELECT count(*) FROM shop_orders WHERE id = $1", &[&id])
        .await?
        .get(0);
    Ok(n == 1)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (dsn, _cluster) = pgcrew::db::database_url_or_throwaway().await?;

    let sent = Arc::new(AtomicUsize::new(0));
    let pool = WorkerPool::builder()
        .concurrency(2)
        .handler("send_receipt", {
            let sent = sent.clone();
            move |_ctx, r: SendReceipt| {
                let sent = sent.clone();
                async move {
                    println!(
                        "  worker: receipt for order {} sent to {}",
                        r.order_id, r.email
                    );
                    sent.fetch_add(1, Ordering::SeqCst);
                    Ok(TaskOutcome::Complete)
                }
            }
        })
        .build()?;
    let config = ClientConfig::builder()
        .heartbeat_interval(Duration::from_secs(1))
        .migrate(true)
        .build()?;
    let client = Client::builder(dsn.as_str())
        .config(config)
        .service(pool)
        .build()
        .await?;
    client
        .db()
        .get()
        .await?
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS shop_orders (
                 id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 email text NOT NULL,
                 amount_cents bigint NOT NULL
             )",
        )
        .await?;
    client.start().await?;

    println!("order 1 (commit):");
    let (kept_order, kept_task) = place_order(&client, "ada@example.com", 4200, true).await?;
    println!("order 2 (rollback):");
    let (lost_order, lost_task) = place_order(&client, "bob@example.com", 990, false).await?;

    // The committed task is processed by the pool; wait for it to finish.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let conn = client.db().get().await?;
    let kept_state = loop {
        let state = queue::get(&conn, kept_task).await?.state;
        if state.is_final() || tokio::time::Instant::now() >= deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    println!("after both transactions:");
    println!(
        "  order {kept_order}: exists = {}; task {kept_task}: {kept_state}",
        order_exists(client.db(), kept_order).await?
    );
    let lost = match queue::get(&conn, lost_task).await {
        Ok(row) => format!("unexpectedly exists ({})", row.state),
        Err(Error::NotFound { .. }) => "does not exist".to_string(),
        Err(e) => return Err(e.into()),
    };
    println!(
        "  order {lost_order}: exists = {}; task {lost_task}: {lost}",
        order_exists(client.db(), lost_order).await?
    );
    println!("  receipts sent: {}", sent.load(Ordering::SeqCst));
    drop(conn);
    client.stop().await?;
    if kept_state != TaskState::Completed || sent.load(Ordering::SeqCst) != 1 {
        return Err("the committed task should have completed exactly once".into());
    }
    Ok(())
}
