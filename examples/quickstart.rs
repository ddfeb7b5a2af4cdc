//! Quick start: connect (migrating the schema), start an instance, become leader, watch
//! instance and leader notifications, stop gracefully.
//!
//! `cargo run --example quickstart` (uses DATABASE_URL, or a throwaway local PostgreSQL).

use std::time::Duration;

use pgcrew::{Client, ClientConfig, EventKind};

#[tokio::main]
async fn main() -> pgcrew::Result<()> {
    let (dsn, _cluster) = pgcrew::db::database_url_or_throwaway().await?;
    let config = ClientConfig::builder()
        .heartbeat_interval(Duration::from_secs(1))
        .instance_ttl(Duration::from_secs(5))
        .leader_ttl(Duration::from_secs(3))
        .migrate(true)
        .build()?;
    let client = Client::builder(dsn.as_str())
        .config(config)
        .on_became_leader(|term| println!("became leader (term {term})"))
        .on_lost_leadership(|| println!("lost leadership"))
        .build()
        .await?;
    let mut events = client.subscribe(&[EventKind::InstanceRegistered, EventKind::LeaderChanged]);
    client.start().await?;
    println!("instance {} started", client.instance_id());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        println!("notification: {event:?}");
    }
    for row in pgcrew::coord::instance::list(client.db()).await? {
        println!(
            "registered: {} on {} (pid {}), leader: {}",
            row.id, row.hostname, row.pid, row.is_leader
        );
    }
    client.stop().await?;
    println!("stopped: resigned and deregistered");
    Ok(())
}
