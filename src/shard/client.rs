//! [`ShardedClient`]: each operation on the shard of its tenant.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Mutex, OnceCell};

use super::RoutingMap;
use crate::coord::notify::{EventKind, Notifier, NotifierConfig, NotifierTask, Subscription};
use crate::db::Db;
use crate::error::{Error, Result};
use crate::ids::{RunId, TaskId, TenantId};
use crate::queue::{Enqueued, NewTask, TaskRow};
use crate::runs::Run;

/// One shard: its name, DSN and (once used) its pool and LISTEN connection.
struct Shard {
    name: String,
    dsn: String,
    db: OnceCell<Db>,
    listener: OnceCell<Notifier>,
    listener_task: Mutex<Option<NotifierTask>>,
}

/// Builds a [`ShardedClient`]: `.shard(name, dsn)` for each shard, then `.routes(map)` or
/// `.routes_file(path)`.
pub struct ShardedClientBuilder {
    shards: Vec<(String, String)>,
    routes: Option<RoutingMap>,
    routes_file: Option<PathBuf>,
    pool_size: usize,
    connect_timeout: Duration,
    poll_interval: Duration,
}

impl std::fmt::Debug for ShardedClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // DSNs may carry passwords: names only.
        f.debug_struct("ShardedClientBuilder")
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.0).collect::<Vec<_>>(),
            )
            .field("routes", &self.routes)
            .field("routes_file", &self.routes_file)
            .finish_non_exhaustive()
    }
}

impl ShardedClientBuilder {
    /// Add a shard (a complete pgcrew installation) under `name`.
    pub fn shard(mut self, name: impl Into<String>, dsn: impl Into<String>) -> Self {
        self.shards.push((name.into(), dsn.into()));
        self
    }

    /// Use this routing map.
    pub fn routes(mut self, map: RoutingMap) -> Self {
        self.routes = Some(map);
        self
    }

    /// Load the routing map from this JSON file (also what [`ShardedClient::reload_routes`]
    /// reads again).
    pub fn routes_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.routes_file = Some(path.into());
        self
    }

    setters! {
        /// Connections per shard pool (default 4).
        pool_size(n: usize) => pool_size = n;
        /// Connect timeout of each shard (default 5 s).
        connect_timeout(d: Duration) => connect_timeout = d;
        /// Fallback poll interval of the run-state subscriptions (default 5 s).
        poll_interval(d: Duration) => poll_interval = d;
    }

    /// Check the shards and the map and build the client. Connects to no shard: each shard is
    /// connected on first use, so a shard that is down fails only its own tenants' operations.
    ///
    /// Errors: [`Error::UnknownShard`], [`Error::TenantInTwoShards`], [`Error::TenantNotRouted`]
    /// (a `moving` entry for a tenant on no shard), [`Error::InvalidInput`] for no shards, a
    /// shard named twice, a bad DSN or no map.
    pub fn build(self) -> Result<ShardedClient> {
        if self.shards.is_empty() {
            return Err(Error::invalid("shards", "give at least one shard"));
        }
        if self.pool_size == 0 {
            return Err(Error::invalid("pool_size", "must be at least 1"));
        }
        let mut shards = BTreeMap::new();
        for (name, dsn) in self.shards {
            if name.trim().is_empty() {
                return Err(Error::invalid("shards", "a shard name is empty"));
            }
            crate::db::parse_dsn(&dsn)?;
            let shard = Shard {
                name: name.clone(),
                dsn,
                db: OnceCell::new(),
                listener: OnceCell::new(),
                listener_task: Mutex::new(None),
            };
            if shards.insert(name.clone(), Arc::new(shard)).is_some() {
                return Err(Error::invalid(
                    "shards",
                    format!("shard `{name}` is given twice"),
                ));
            }
        }
        let routes = match (self.routes, &self.routes_file) {
            (Some(m), _) => m,
            (None, Some(path)) => RoutingMap::load(path)?,
            (None, None) => {
                return Err(Error::invalid(
                    "routes",
                    "give a routing map (.routes) or its file (.routes_file)",
                ));
            }
        };
        let names: Vec<&str> = shards.keys().map(String::as_str).collect();
        routes.validate(&names)?;
        Ok(ShardedClient {
            inner: Arc::new(Inner {
                shards,
                routes: RwLock::new(routes),
                routes_file: self.routes_file,
                pool_size: self.pool_size,
                connect_timeout: self.connect_timeout,
                poll_interval: self.poll_interval,
            }),
        })
    }
}

struct Inner {
    shards: BTreeMap<String, Arc<Shard>>,
    routes: RwLock<RoutingMap>,
    routes_file: Option<PathBuf>,
    pool_size: usize,
    connect_timeout: Duration,
    poll_interval: Duration,
}

/// A client of many pgcrew installations (shards), each tenant on one: enqueue, submit runs,
/// read runs and tasks, and subscribe to run-state notifications on the tenant's shard.
/// Cheap to clone.
///
/// A shard that cannot be reached fails its tenants' operations with [`Error::ShardDown`];
/// the other shards' tenants are unaffected. New work for a tenant being moved is refused with
/// [`Error::TenantMoving`].
#[derive(Clone)]
pub struct ShardedClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ShardedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedClient")
            .field("shards", &self.inner.shards.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// `e` as [`Error::ShardDown`] when it means the shard cannot be reached.
fn down(shard: &str, e: Error) -> Error {
    let unreachable = match &e {
        Error::Connect { .. } | Error::Pool(_) | Error::Timeout(_) => true,
        Error::Database(pg) => pg.is_closed() || pg.as_db_error().is_none() || e.is_transient(),
        _ => false,
    };
    if unreachable {
        Error::ShardDown {
            shard: shard.to_string(),
            message: e.to_string(),
        }
    } else {
        e
    }
}

impl ShardedClient {
    /// A builder (pool of 4 per shard, connect timeout 5 s).
    pub fn builder() -> ShardedClientBuilder {
        ShardedClientBuilder {
            shards: Vec::new(),
            routes: None,
            routes_file: None,
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_secs(5),
        }
    }

    /// The shard names.
    pub fn shard_names(&self) -> Vec<String> {
        self.inner.shards.keys().cloned().collect()
    }

    /// A copy of the routing map in use.
    pub fn routes(&self) -> RoutingMap {
        self.inner
            .routes
            .read()
            .map(|m| m.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Replace the routing map (checked against the shards first; the old one stays on error).
    pub fn set_routes(&self, map: RoutingMap) -> Result<()> {
        let names: Vec<&str> = self.inner.shards.keys().map(String::as_str).collect();
        map.validate(&names)?;
        match self.inner.routes.write() {
            Ok(mut g) => *g = map,
            Err(p) => *p.into_inner() = map,
        }
        Ok(())
    }

    /// Read the routing file again (the one given to the builder) and use it.
    pub fn reload_routes(&self) -> Result<()> {
        let Some(path) = &self.inner.routes_file else {
            return Err(Error::invalid(
                "routes",
                "this client was built with a map, not a routing file",
            ));
        };
        self.set_routes(RoutingMap::load(path)?)
    }

    /// The name of the shard holding `tenant`.
    pub fn shard_of(&self, tenant: &TenantId) -> Result<String> {
        let routes = self.routes();
        routes.shard_of(tenant.as_str()).map(str::to_string)
    }

    fn shard(&self, name: &str) -> Result<&Arc<Shard>> {
        self.inner
            .shards
            .get(name)
            .ok_or_else(|| Error::UnknownShard {
                shard: name.to_string(),
                tenant: None,
                configured: self.shard_names().join(", "),
            })
    }

    /// The shard of `tenant`; for new work, refused while the tenant is moving.
    fn route(&self, tenant: &TenantId, new_work: bool) -> Result<&Arc<Shard>> {
        let routes = self.routes();
        let name = routes.shard_of(tenant.as_str())?;
        if new_work && let Some(to) = routes.moving_to(tenant.as_str()) {
            return Err(Error::TenantMoving {
                tenant: tenant.to_string(),
                from: name.to_string(),
                to: to.to_string(),
            });
        }
        self.shard(name)
    }

    async fn db_of(&self, shard: &Shard) -> Result<Db> {
        let inner = &self.inner;
        shard
            .db
            .get_or_try_init(|| async {
                Db::connect(&shard.dsn, inner.pool_size, inner.connect_timeout).await
            })
            .await
            .cloned()
            .map_err(|e| down(&shard.name, e))
    }

    /// The pool of shard `name` (connected on first use).
    pub async fn shard_db(&self, name: &str) -> Result<Db> {
        let shard = self.shard(name)?.clone();
        self.db_of(&shard).await
    }

    /// The pool of `tenant`'s shard.
    pub async fn db(&self, tenant: &TenantId) -> Result<Db> {
        let shard = self.route(tenant, false)?.clone();
        self.db_of(&shard).await
    }

    async fn new_work(&self, tenant: &TenantId) -> Result<(Db, String)> {
        let shard = self.route(tenant, true)?.clone();
        Ok((self.db_of(&shard).await?, shard.name.clone()))
    }

    /// Enqueue a task on its tenant's shard.
    pub async fn enqueue(&self, task: &NewTask) -> Result<Enqueued> {
        let (db, shard) = self.new_work(&task.tenant).await?;
        let r = async {
            let conn = db.get().await?;
            crate::queue::enqueue(&conn, task).await
        }
        .await;
        r.map_err(|e| down(&shard, e))
    }

    /// Enqueue tasks, each on its tenant's shard (one statement per shard); ids in input order.
    /// All or nothing per shard: a shard that fails leaves the others' tasks enqueued.
    pub async fn enqueue_many(&self, tasks: &[NewTask]) -> Result<Vec<TaskId>> {
        let mut by_shard: BTreeMap<String, (Db, Vec<usize>)> = BTreeMap::new();
        for (i, t) in tasks.iter().enumerate() {
            let shard = self.route(&t.tenant, true)?.name.clone();
            if !by_shard.contains_key(&shard) {
                let (db, _) = self.new_work(&t.tenant).await?;
                by_shard.insert(shard.clone(), (db, Vec::new()));
            }
            if let Some(e) = by_shard.get_mut(&shard) {
                e.1.push(i);
            }
        }
        let mut out = vec![TaskId(0); tasks.len()];
        for (shard, (db, idx)) in by_shard {
            let batch: Vec<NewTask> = idx.iter().map(|&i| tasks[i].clone()).collect();
            let ids = async {
                let conn = db.get().await?;
                crate::queue::enqueue_many(&conn, &batch).await
            }
            .await
            .map_err(|e| down(&shard, e))?;
            for (i, id) in idx.into_iter().zip(ids) {
                out[i] = id;
            }
        }
        Ok(out)
    }

    /// Submit a run (`pgcrew.submit_run`) on the tenant's shard; see
    /// [`crate::client::submit_run`].
    pub async fn submit_run(
        &self,
        agent: &str,
        tenant: &TenantId,
        session: Option<&str>,
        input: &Value,
    ) -> Result<RunId> {
        let (db, shard) = self.new_work(tenant).await?;
        crate::client::submit_run(&db, agent, tenant, session, input)
            .await
            .map_err(|e| down(&shard, e))
    }

    /// Read a run of `tenant` ([`Error::NotFound`] when it is not this tenant's).
    pub async fn get_run(&self, tenant: &TenantId, run: RunId) -> Result<Run> {
        let shard = self.route(tenant, false)?.clone();
        let db = self.db_of(&shard).await?;
        let r = crate::runs::get_run(&db, run)
            .await
            .map_err(|e| down(&shard.name, e))?;
        if r.tenant_id != *tenant {
            return Err(Error::not_found("run", run));
        }
        Ok(r)
    }

    /// Read a task of `tenant` ([`Error::NotFound`] when it is not this tenant's).
    pub async fn get_task(&self, tenant: &TenantId, id: TaskId) -> Result<TaskRow> {
        let shard = self.route(tenant, false)?.clone();
        let db = self.db_of(&shard).await?;
        let t = async {
            let conn = db.get().await?;
            crate::queue::get(&conn, id).await
        }
        .await
        .map_err(|e| down(&shard.name, e))?;
        if t.tenant_id != *tenant {
            return Err(Error::not_found("task", id));
        }
        Ok(t)
    }

    async fn notifier_of(&self, shard: &Arc<Shard>) -> Result<Notifier> {
        let db = self.db_of(shard).await?;
        let poll = self.inner.poll_interval;
        let timeout = self.inner.connect_timeout;
        let n = shard
            .listener
            .get_or_try_init(|| async {
                let notifier = Notifier::new(1024);
                let task = notifier.spawn_listener(NotifierConfig {
                    pg_config: db.config().clone(),
                    poll_only: false,
                    poll_interval: poll,
                    instance: None,
                });
                *shard.listener_task.lock().await = Some(task);
                if !notifier.wait_connected(timeout).await {
                    return Err(Error::ShardDown {
                        shard: shard.name.clone(),
                        message: format!("LISTEN connection not up within {timeout:?}"),
                    });
                }
                Ok(notifier)
            })
            .await?;
        Ok(n.clone())
    }

    /// Subscribe to notifications of `kinds` (empty: all) on `tenant`'s shard, starting that
    /// shard's LISTEN connection on first use. Payloads carry ids only and the shard's other
    /// tenants' runs notify on it too: re-read with [`ShardedClient::get_run`].
    pub async fn subscribe(&self, tenant: &TenantId, kinds: &[EventKind]) -> Result<Subscription> {
        let shard = self.route(tenant, false)?.clone();
        Ok(self.notifier_of(&shard).await?.subscribe(kinds))
    }

    /// Wait until `tenant`'s run is finished and return it (woken by the shard's
    /// `pgcrew_run_state_changed`, polling as a fallback).
    pub async fn wait_for_run(
        &self,
        tenant: &TenantId,
        run: RunId,
        timeout: Duration,
    ) -> Result<Run> {
        let shard = self.route(tenant, false)?.clone();
        let db = self.db_of(&shard).await?;
        let notifier = self.notifier_of(&shard).await?;
        let r = crate::client::wait_for_run(&db, &notifier, run, timeout, self.inner.poll_interval)
            .await
            .map_err(|e| down(&shard.name, e))?;
        if r.tenant_id != *tenant {
            return Err(Error::not_found("run", run));
        }
        Ok(r)
    }

    /// Stop the shards' LISTEN connections.
    pub async fn close(&self) {
        for shard in self.inner.shards.values() {
            if let Some(t) = shard.listener_task.lock().await.take() {
                t.stop().await;
            }
        }
    }
}
