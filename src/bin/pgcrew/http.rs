//! `pgcrew ui` and the HTTP side of `pgcrew serve --http`: one function builds the app's
//! router ([`app`], the place to merge more routers such as metrics), one serves it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use clap::Args;
use pgcrew::{Client, ClientConfig, InstanceId, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::output::{duration_arg, require_dsn};

/// The HTTP app every `pgcrew` server mounts: the operations console (`pgcrew::ui`) and the
/// Prometheus endpoint `/metrics` (`pgcrew::metrics`). Routers of other HTTP features are merged
/// here.
pub fn app(client: &Client) -> Router {
    pgcrew::ui::router(client).merge(pgcrew::metrics::router(client))
}

/// A running HTTP server; [`HttpServer::stop`] ends it gracefully.
pub struct HttpServer {
    shutdown: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

impl HttpServer {
    /// Stop accepting, finish open requests (SSE streams end), and wait.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.handle).await;
    }
}

/// Bind `addr` and serve `app` in the background; prints the address on stdout.
pub async fn start(addr: SocketAddr, app: Router) -> Result<HttpServer> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| pgcrew::Error::invalid("listen", format!("cannot bind {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| pgcrew::Error::invalid("listen", e.to_string()))?;
    if !bound.ip().is_loopback() && !pgcrew::ui::UiConfig::from_env().actions_enabled() {
        eprintln!(
            "pgcrew: the console listens on {bound}, beyond this host (read-only: no PGCREW_UI_TOKEN)"
        );
    }
    println!("console http://{bound}/");
    let (shutdown, mut rx) = watch::channel(false);
    let handle = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            eprintln!("pgcrew: console server: {e}");
        }
    });
    Ok(HttpServer { shutdown, handle })
}

/// Flags of `pgcrew ui`.
#[derive(Debug, Args)]
pub struct UiArgs {
    /// Address to serve the console on (localhost by default).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Instance id of the console (default: a random UUID).
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Heartbeat interval of the console's instance.
    #[arg(long, value_parser = duration_arg, default_value = "30s")]
    pub heartbeat_interval: Duration,
    /// Listener fallback poll interval.
    #[arg(long, value_parser = duration_arg, default_value = "5s")]
    pub poll_interval: Duration,
    /// Connections the console may open in all (LISTEN included; at least 3).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub max_connections: usize,
}

/// `pgcrew ui`: an instance that takes no leadership and runs no work, serving the console.
pub async fn ui(dsn: Option<String>, args: UiArgs) -> Result<ExitCode> {
    pgcrew::ui::UiConfig::from_env().validate()?;
    let dsn = require_dsn(dsn)?;
    let mut b = ClientConfig::builder()
        .leader_election(false)
        .heartbeat_interval(args.heartbeat_interval)
        .notify_poll_interval(args.poll_interval)
        .max_connections(args.max_connections)
        .metadata(serde_json::json!({"role": "console"}))
        .statements(crate::output::statements());
    if let Some(id) = args.instance_id {
        b = b.instance_id(InstanceId::new(id)?);
    }
    let client = Client::builder(dsn)
        .config(b.build()?)
        .on_error(|e| eprintln!("pgcrew ui: {e}"))
        .build()
        .await?;
    client.start().await?;
    let server = start(args.listen, app(&client)).await?;
    crate::coord::wait_for_signal().await;
    server.stop().await;
    client.stop().await?;
    Ok(ExitCode::SUCCESS)
}
