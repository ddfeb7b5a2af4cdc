//! `pgcrew demo --ui` and `--keep`: the operations console on the demo's database while the
//! demo runs and after it, and the database left in place with its DSN and example queries.

use std::net::SocketAddr;

use pgcrew::{Client, ClientConfig, InstanceId, Result};

use crate::http::{HttpServer, app, start};

/// The console's instance and server.
pub struct Console {
    client: Client,
    server: HttpServer,
}

/// Start a console instance (no leadership, no work) on `dsn`, served on `addr`.
pub async fn open(dsn: &str, addr: SocketAddr) -> Result<Console> {
    let config = ClientConfig::builder()
        .instance_id(InstanceId::new("demo-console")?)
        .leader_election(false)
        .max_connections(5)
        .heartbeat_interval(std::time::Duration::from_millis(500))
        .metadata(serde_json::json!({"role": "console"}))
        .build()?;
    let client = Client::builder(dsn).config(config).build().await?;
    client.start().await?;
    let server = start(addr, app(&client)).await?;
    println!("operations console: open the address above in a browser (live while the demo runs)");
    Ok(Console { client, server })
}

impl Console {
    /// Stop serving and deregister.
    pub async fn close(self) {
        self.server.stop().await;
        let _ = self.client.stop().await;
    }
}

/// Print the kept database's DSN and three queries to start with.
pub fn print_kept(dsn: &str) {
    println!("\nthe demo database is kept:");
    println!("  DATABASE_URL=\"{dsn}\"");
    println!("three queries to start with (psql \"$DATABASE_URL\"):");
    println!("  SELECT state, count(*) FROM pgcrew.runs GROUP BY state;");
    println!(
        "  SELECT tenant_id, day, model, sum(cost_usd) FROM pgcrew.tenant_costs GROUP BY 1, 2, 3 ORDER BY 2, 1;"
    );
    println!(
        "  SELECT run_id, seq, event_type, step_key FROM pgcrew.events ORDER BY created_at DESC LIMIT 20;"
    );
    println!("and the console on it: DATABASE_URL=\"{dsn}\" pgcrew ui");
}
