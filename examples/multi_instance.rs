//! Three instances in one process share one database: exactly one leads; stopping the leader
//! hands leadership to another at once.
//!
//! `cargo run --example multi_instance` (uses DATABASE_URL, or a throwaway local PostgreSQL).

use std::time::Duration;

use pgcrew::{Client, ClientConfig, InstanceId};

#[tokio::main]
async fn main() -> pgcrew::Result<()> {
    let (dsn, _cluster) = pgcrew::db::database_url_or_throwaway().await?;
    let db = pgcrew::Db::connect(&dsn, 8, Duration::from_secs(10)).await?;
    db.migrate().await?;
    let mut clients = Vec::new();
    for i in 1..=3 {
        let name = format!("instance-{i}");
        let config = ClientConfig::builder()
            .instance_id(InstanceId::new(&name)?)
            .heartbeat_interval(Duration::from_millis(500))
            .instance_ttl(Duration::from_secs(3))
            .leader_ttl(Duration::from_secs(2))
            .build()?;
        let client = Client::builder(db.clone())
            .config(config)
            .on_became_leader(move |term| println!("{name} became leader (term {term})"))
            .build()
            .await?;
        client.start().await?;
        clients.push(client);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leader = clients.iter().position(|c| c.is_leader());
    println!(
        "leader: {:?}",
        leader.map(|i| clients[i].instance_id().to_string())
    );
    if let Some(i) = leader {
        let old = clients.remove(i);
        old.stop().await?;
        println!("{} stopped gracefully", old.instance_id());
        tokio::time::sleep(Duration::from_millis(300)).await;
        for c in &clients {
            println!("{}: leader = {}", c.instance_id(), c.is_leader());
        }
    }
    for c in clients {
        c.stop().await?;
    }
    Ok(())
}
