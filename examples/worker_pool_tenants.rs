//! A worker pool serving two tenants with different concurrency limits.
//!
//! Two tenants are created with `tenancy::upsert`: `acme` may run at most 2 tasks at once,
//! `globex` at most 5. Sixty tasks of two kinds (`resize_image`, `send_email`), each with its
//! own typed payload, are enqueued in bulk (one statement per tenant). A `WorkerPool` with 8
//! slots runs handlers registered by kind; the claim function shares the slots fairly across
//! tenants and never exceeds a tenant's limit. The example prints per-tenant progress while the
//! pool works (done / running now / most ever running) and the pool's metrics at the end.
//!
//! `cargo run --example worker_pool_tenants` (uses DATABASE_URL, or a throwaway local
//! PostgreSQL).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgcrew::queue::{self, NewTask, TaskOutcome, WorkerPool};
use pgcrew::tenancy::{self, TenantContext};
use pgcrew::{Client, ClientConfig};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct ResizeImage {
    image_id: u32,
    width: u32,
}

#[derive(Serialize, Deserialize)]
struct SendEmail {
    to: String,
    subject: String,
}

/// What the handlers observed for one tenant.
#[derive(Default)]
struct TenantProgress {
    running: AtomicUsize,
    most_running: AtomicUsize,
    done: AtomicUsize,
}

/// Per-tenant progress, keyed by tenant id.
#[derive(Default)]
struct Progress(Mutex<BTreeMap<String, Arc<TenantProgress>>>);

impl Progress {
    fn of(&self, tenant: &str) -> Arc<TenantProgress> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(tenant.to_string()).or_default().clone()
    }

    /// Simulate `work` for the task's tenant, counting it as running meanwhile.
    async fn work(&self, tenant: &str, work: Duration) {
        let p = self.of(tenant);
        let now = p.running.fetch_add(1, Ordering::SeqCst) + 1;
        p.most_running.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(work).await;
        p.running.fetch_sub(1, Ordering::SeqCst);
        p.done.fetch_add(1, Ordering::SeqCst);
    }
}

const PER_TENANT: usize = 30;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (dsn, _cluster) = pgcrew::db::database_url_or_throwaway().await?;

    let progress = Arc::new(Progress::default());
    let pool = WorkerPool::builder()
        .concurrency(8)
        .poll_interval(Duration::from_millis(200))
        .handler("resize_image", {
            let progress = progress.clone();
            move |ctx, job: ResizeImage| {
                let progress = progress.clone();
                async move {
                    // A real handler would fetch, resize and store the image here.
                    let _ = (job.image_id, job.width);
                    progress
                        .work(ctx.tenant.as_str(), Duration::from_millis(60))
                        .await;
                    Ok(TaskOutcome::Complete)
                }
            }
        })
        .handler("send_email", {
            let progress = progress.clone();
            move |ctx, email: SendEmail| {
                let progress = progress.clone();
                async move {
                    let _ = (email.to, email.subject);
                    progress
                        .work(ctx.tenant.as_str(), Duration::from_millis(40))
                        .await;
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
        .service(pool.clone())
        .build()
        .await?;

    // Two tenants with different per-tenant task limits.
    let limits = [("acme", 2), ("globex", 5)];
    for (name, max_tasks) in limits {
        let ctx = TenantContext::new(name)?.limits(None, Some(max_tasks));
        tenancy::upsert(client.db(), &ctx).await?;
        println!("tenant {name}: max_concurrent_tasks = {max_tasks}");
    }

    // Enqueue each tenant's tasks in bulk: one statement per tenant.
    {
        let conn = client.db().get().await?;
        for (name, _) in limits {
            let tenant = pgcrew::TenantId::new(name)?;
            let mut tasks = Vec::with_capacity(PER_TENANT);
            for i in 0..PER_TENANT {
                let task = if i % 3 == 0 {
                    let email = SendEmail {
                        to: format!("user{i}@{name}.example"),
                        subject: "your images are ready".into(),
                    };
                    NewTask::new("send_email", &email)?
                } else {
                    let image_id = u32::try_from(i).unwrap_or(u32::MAX);
                    NewTask::new(
                        "resize_image",
                        &ResizeImage {
                            image_id,
                            width: 640,
                        },
                    )?
                };
                tasks.push(task.tenant(tenant.clone()));
            }
            let ids = queue::enqueue_many(&conn, &tasks).await?;
            println!("enqueued {} tasks for {name}", ids.len());
        }
    }

    client.start().await?;
    println!("worker pool started on instance {}", client.instance_id());

    let total = PER_TENANT * limits.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut line = Vec::new();
        let mut done = 0;
        for (name, limit) in limits {
            let p = progress.of(name);
            let d = p.done.load(Ordering::SeqCst);
            done += d;
            line.push(format!(
                "{name}: {d:>2}/{PER_TENANT} done, running {} (most {} / limit {limit})",
                p.running.load(Ordering::SeqCst),
                p.most_running.load(Ordering::SeqCst),
            ));
        }
        println!("{}", line.join(" | "));
        if done >= total || tokio::time::Instant::now() >= deadline {
            break;
        }
    }

    client.stop().await?;

    // The database's view, per tenant.
    let conn = client.db().get().await?;
    for (name, _) in limits {
        let tenant = pgcrew::TenantId::new(name)?;
        let completed = queue::list(
            &conn,
            Some(queue::TaskState::Completed),
            None,
            Some(&tenant),
            10_000,
        )
        .await?;
        println!(
            "{name}: {} tasks completed in pgcrew.tasks",
            completed.len()
        );
    }
    let m = pool.metrics().snapshot();
    println!(
        "metrics: claimed {}, executed {}, succeeded {}, failed {}, in flight {}, \
         throughput {:.1}/s, queue lag {:.1} ms",
        m.claimed,
        m.executed,
        m.succeeded,
        m.failed,
        m.in_flight,
        m.throughput_per_sec,
        m.queue_lag_ms
    );
    for (name, limit) in limits {
        let most = progress.of(name).most_running.load(Ordering::SeqCst);
        println!("{name}: at most {most} ran at once (limit {limit})");
        if most > limit as usize {
            return Err(format!("{name} exceeded its limit of {limit}").into());
        }
    }
    if m.succeeded < total as u64 {
        return Err(format!("only {} of {total} tasks succeeded", m.succeeded).into());
    }
    Ok(())
}
