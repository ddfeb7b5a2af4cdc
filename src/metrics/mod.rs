//! Prometheus `/metrics`: this instance's own series ([`crate::telemetry`]), its scrape-time
//! gauges (leader state and term, connection pool, notifier, uptime) and, on the leader only,
//! cluster-wide gauges read from the database at most once per
//! [`MetricsConfig::cluster_interval`] (queue depth and oldest available age per queue,
//! instances alive, stuck runs, budget use and status per tenant). When the database does not
//! answer, `/metrics` still answers at once with the last cluster values and
//! `pgcrew_cluster_stale 1`.
//!
//! Serve it on your own listener, or merge [`router`] into an axum app:
//!
//! ```no_run
//! # async fn demo(client: pgcrew::Client) -> std::io::Result<()> {
//! let app = pgcrew::metrics::router(&client);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9090").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! The body is OpenMetrics when the scraper asks for it (Prometheus does), otherwise the
//! Prometheus text format 0.0.4 ([`text`]); series names carry their unit (`_seconds`, `_usd`,
//! `_ratio`) and counters end in `_total`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::client::Client;
use crate::telemetry::{self, MAX_SERIES};

pub mod cluster;
pub mod text;

pub use cluster::ClusterSnapshot;

/// The `Content-Type` of the body.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which instances report the cluster-wide gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClusterGauges {
    /// The leader only (N instances do not multiply the load on the database).
    #[default]
    LeaderOnly,
    /// This instance whether or not it leads (one instance without election, e.g. a dashboard).
    Always,
    /// None.
    Never,
}

/// Settings of the `/metrics` endpoint.
#[derive(Debug, Clone, Copy)]
pub struct MetricsConfig {
    /// Cluster gauges are read at most this often (set it to the scrape interval).
    pub cluster_interval: Duration,
    /// A read of the cluster gauges that takes longer is abandoned (values marked stale).
    pub cluster_timeout: Duration,
    /// Who reports them.
    pub cluster_gauges: ClusterGauges,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            cluster_interval: Duration::from_secs(10),
            cluster_timeout: Duration::from_secs(2),
            cluster_gauges: ClusterGauges::LeaderOnly,
        }
    }
}

/// The endpoint's state: the client and the cached cluster gauges. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    client: Client,
    config: MetricsConfig,
    cache: Arc<tokio::sync::Mutex<cluster::ClusterCache>>,
    started: std::time::Instant,
}

/// The `/metrics` route on its own (merge it into another router).
pub fn router(client: &Client) -> Router {
    router_with(client, MetricsConfig::default())
}

/// [`router`] with settings.
pub fn router_with(client: &Client, config: MetricsConfig) -> Router {
    Router::new()
        .route("/metrics", get(handler))
        .with_state(Metrics::new(client).with_config(config))
}

/// The axum handler of `GET /metrics` (state: [`Metrics`]): OpenMetrics when the request
/// accepts it (as Prometheus does), the Prometheus text format otherwise.
pub async fn handler(State(metrics): State<Metrics>, headers: HeaderMap) -> Response {
    let body = metrics.render().await;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, text::TEXT_CONTENT_TYPE)],
            text::to_text_004(&body),
        )
            .into_response()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabel {
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceVersion {
    instance: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueState {
    queue: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueOnly {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantStatus {
    tenant: String,
    status: String,
}

type F64Gauge = Gauge<f64, std::sync::atomic::AtomicU64>;

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g: Gauge = Gauge::default();
    g.set(v);
    reg.register(name, help, g);
}

fn f64_gauge(reg: &mut Registry, name: &str, help: &str, v: f64) {
    let g = F64Gauge::default();
    g.set(v);
    reg.register(name, help, g);
}

impl Metrics {
    /// The endpoint of `client`, with default settings.
    pub fn new(client: &Client) -> Metrics {
        Metrics {
            client: client.clone(),
            config: MetricsConfig::default(),
            cache: Arc::default(),
            started: std::time::Instant::now(),
        }
    }

    /// With these settings.
    pub fn with_config(mut self, config: MetricsConfig) -> Metrics {
        self.config = config;
        self
    }

    /// Whether this instance reports the cluster gauges now.
    fn reports_cluster(&self) -> bool {
        match self.config.cluster_gauges {
            ClusterGauges::LeaderOnly => self.client.is_leader(),
            ClusterGauges::Always => true,
            ClusterGauges::Never => false,
        }
    }

    /// The body of `/metrics` (OpenMetrics text).
    pub async fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let _ = encode_registry(&mut out, telemetry::global().registry());
        let mut reg = Registry::with_prefix("pgcrew");
        self.instance_gauges(&mut reg);
        if self.reports_cluster() {
            let mut cache = self.cache.lock().await;
            cache
                .refresh_if_due(
                    self.client.db(),
                    self.config.cluster_interval,
                    self.config.cluster_timeout,
                    self.client.config().instance_ttl,
                )
                .await;
            cluster_gauges(&mut reg, &cache);
        }
        let _ = encode_registry(&mut out, &reg);
        let _ = encode_eof(&mut out);
        out
    }

    fn instance_gauges(&self, reg: &mut Registry) {
        let instance = self.client.instance_id().to_string();
        let il = InstanceLabel {
            instance: instance.clone(),
        };
        let leader: Family<InstanceLabel, Gauge> = Family::default();
        let term = self.client.leader_term();
        leader.get_or_create(&il).set(i64::from(term.is_some()));
        reg.register(
            "leader",
            "1 while this instance holds the leader lease",
            leader,
        );
        let term_g: Family<InstanceLabel, Gauge> = Family::default();
        term_g.get_or_create(&il).set(term.unwrap_or(0));
        reg.register(
            "leader_term",
            "The fencing term while leader (0 otherwise)",
            term_g,
        );
        let up: Family<InstanceVersion, Gauge> = Family::default();
        up.get_or_create(&InstanceVersion {
            instance,
            version: crate::VERSION.to_string(),
        })
        .set(i64::from(self.client.is_running()));
        reg.register("instance_running", "1 while this instance is started", up);
        f64_gauge(
            reg,
            "instance_uptime_seconds",
            "Seconds since this endpoint was built",
            self.started.elapsed().as_secs_f64(),
        );
        let status = self.client.db().pool().status();
        gauge(
            reg,
            "db_pool_size",
            "Connections open in the pool",
            status.size as i64,
        );
        gauge(
            reg,
            "db_pool_max_size",
            "The pool's maximum size",
            status.max_size as i64,
        );
        gauge(
            reg,
            "db_pool_available",
            "Idle connections in the pool",
            status.available as i64,
        );
        gauge(
            reg,
            "db_pool_waiting",
            "Callers waiting for a pooled connection",
            status.waiting as i64,
        );
        gauge(
            reg,
            "notifier_connected",
            "1 while the LISTEN connection is up",
            i64::from(self.client.notifier().is_connected()),
        );
    }
}

fn cluster_gauges(reg: &mut Registry, cache: &cluster::ClusterCache) {
    gauge(
        reg,
        "cluster_stale",
        "1 when the last read of the cluster gauges failed (the values are the last read)",
        i64::from(cache.failed || cache.last.is_none()),
    );
    let age = cache
        .last
        .as_ref()
        .map_or(-1.0, |(_, at)| at.elapsed().as_secs_f64());
    f64_gauge(
        reg,
        "cluster_age_seconds",
        "Age of the cluster gauges (-1 before the first read)",
        age,
    );
    gauge(
        reg,
        "cluster_read_errors",
        "Failed reads of the cluster gauges since the endpoint was built",
        cache.errors as i64,
    );
    let Some((snap, _)) = &cache.last else { return };
    let depth: Family<QueueState, Gauge> = Family::default();
    let oldest: Family<QueueOnly, F64Gauge> = Family::default();
    for q in snap.queues.iter().take(MAX_SERIES) {
        depth
            .get_or_create(&QueueState {
                queue: q.queue.clone(),
                state: q.state.clone(),
            })
            .set(q.tasks);
        if let Some(age) = q.oldest_available_s {
            oldest
                .get_or_create(&QueueOnly {
                    queue: q.queue.clone(),
                })
                .set(age.max(0.0));
        }
    }
    reg.register("queue_depth", "Tasks per queue and non-final state", depth);
    reg.register(
        "queue_oldest_available_seconds",
        "Age of the oldest due available task per queue",
        oldest,
    );
    gauge(
        reg,
        "instances_alive",
        "Instances with a heartbeat within the instance TTL",
        snap.instances_alive,
    );
    gauge(
        reg,
        "runs_stuck",
        "Rows of pgcrew.stuck_runs",
        snap.stuck_runs,
    );
    gauge(reg, "runs_running", "Runs running", snap.running_runs);
    gauge(reg, "runs_pending", "Runs pending", snap.pending_runs);
    let ratio: Family<TenantLabel, F64Gauge> = Family::default();
    let status: Family<TenantStatus, Gauge> = Family::default();
    for b in snap.budgets.iter().take(MAX_SERIES * 5) {
        if let Some(r) = b.used_ratio {
            ratio
                .get_or_create(&TenantLabel {
                    tenant: b.tenant.clone(),
                })
                .set(r);
        }
        status
            .get_or_create(&TenantStatus {
                tenant: b.tenant.clone(),
                status: b.status.clone(),
            })
            .set(1);
    }
    reg.register(
        "budget_used_ratio",
        "Spent / limit per tenant (tenants with a limit)",
        ratio,
    );
    reg.register(
        "budget_status",
        "1 for each tenant's current budget status",
        status,
    );
}
