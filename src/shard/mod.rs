//! Tenants sharded across PostgreSQL clusters, for when one primary is not enough.
//!
//! Each shard is a complete pgcrew installation (its own schema, instances, leader and
//! installation secret). A [`RoutingMap`] says which shard holds each tenant; a
//! [`ShardedClient`] built from the shards' DSNs and the map sends each operation (enqueue,
//! submit, reads, run-state notifications) to the tenant's shard. [`move_tenant`] moves a tenant
//! between shards (drain, copy with the ledgers' hash chains, verify, delete, switch).
//!
//! The map is a JSON file kept next to the service's configuration (DSNs stay out of it: they
//! carry passwords and are given to the builder):
//!
//! ```json
//! { "shards": { "eu-1": ["acme", "globex"], "us-1": ["initech"] },
//!   "moving": { "globex": "us-1" } }
//! ```
//!
//! `moving` marks tenants in the middle of a move (source: the shard listing them, target: the
//! value): their new work is refused ([`Error::TenantMoving`]) while reads still go to the
//! source. A map naming a shard the client was not given ([`Error::UnknownShard`]) or a tenant
//! on two shards ([`Error::TenantInTwoShards`]) is refused when loaded.

mod client;
mod transfer;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use client::{ShardedClient, ShardedClientBuilder};
pub use transfer::{MoveOptions, MoveReport, move_tenant};

/// Which shard holds each tenant (see the [module docs](self) for the file format).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingMap {
    /// Shard name → its tenants.
    pub shards: BTreeMap<String, Vec<String>>,
    /// Tenants being moved → their target shard.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub moving: BTreeMap<String, String>,
}

impl RoutingMap {
    /// Parse a map from JSON and check it ([`RoutingMap::validate`] without shard names).
    pub fn from_json(text: &str) -> Result<RoutingMap> {
        let map: RoutingMap = serde_json::from_str(text)
            .map_err(|e| Error::invalid("routing map", format!("not a routing map: {e}")))?;
        map.index()?;
        Ok(map)
    }

    /// Read a map from a JSON file.
    pub fn load(path: &Path) -> Result<RoutingMap> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::invalid(
                "routing map",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        Self::from_json(&text)
    }

    /// Write the map to `path` atomically (a temporary file renamed over it), so a reader sees
    /// the old map or the new one, never half of one.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.index()?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Tenant → shard, refusing a tenant listed twice.
    fn index(&self) -> Result<BTreeMap<&str, &str>> {
        let mut index: BTreeMap<&str, &str> = BTreeMap::new();
        for (shard, tenants) in &self.shards {
            for t in tenants {
                if let Some(first) = index.insert(t.as_str(), shard.as_str()) {
                    let (first, second) = if first == shard {
                        (first.to_string(), format!("{shard} (listed twice)"))
                    } else {
                        (first.to_string(), shard.clone())
                    };
                    return Err(Error::TenantInTwoShards {
                        tenant: t.clone(),
                        first,
                        second,
                    });
                }
            }
        }
        for (tenant, target) in &self.moving {
            if !index.contains_key(tenant.as_str()) {
                return Err(Error::TenantNotRouted {
                    tenant: tenant.clone(),
                });
            }
            if !self.shards.contains_key(target) {
                return Err(Error::UnknownShard {
                    shard: target.clone(),
                    tenant: Some(tenant.clone()),
                    configured: self.shards.keys().cloned().collect::<Vec<_>>().join(", "),
                });
            }
        }
        Ok(index)
    }

    /// Check the map against the configured shard names: every shard it names (with tenants or
    /// as a move target) must be configured, and no tenant may be on two shards.
    pub fn validate(&self, configured: &[&str]) -> Result<()> {
        self.index()?;
        let known = |s: &str| configured.contains(&s);
        let list = || configured.join(", ");
        for (shard, tenants) in &self.shards {
            if !known(shard) {
                return Err(Error::UnknownShard {
                    shard: shard.clone(),
                    tenant: tenants.first().cloned(),
                    configured: list(),
                });
            }
        }
        for (tenant, target) in &self.moving {
            if !known(target) {
                return Err(Error::UnknownShard {
                    shard: target.clone(),
                    tenant: Some(tenant.clone()),
                    configured: list(),
                });
            }
        }
        Ok(())
    }

    /// The shard holding `tenant`.
    pub fn shard_of(&self, tenant: &str) -> Result<&str> {
        self.shards
            .iter()
            .find(|(_, ts)| ts.iter().any(|t| t == tenant))
            .map(|(s, _)| s.as_str())
            .ok_or_else(|| Error::TenantNotRouted {
                tenant: tenant.to_string(),
            })
    }

    /// The target shard when `tenant` is being moved.
    pub fn moving_to(&self, tenant: &str) -> Option<&str> {
        self.moving.get(tenant).map(String::as_str)
    }

    /// Mark `tenant` as moving to `target` (its new work is refused from now on).
    pub fn begin_move(&mut self, tenant: &str, target: &str) -> Result<()> {
        let source = self.shard_of(tenant)?.to_string();
        if source == target {
            return Err(Error::invalid(
                "target shard",
                format!("tenant `{tenant}` is already on shard `{target}`"),
            ));
        }
        if !self.shards.contains_key(target) {
            self.shards.insert(target.to_string(), Vec::new());
        }
        self.moving.insert(tenant.to_string(), target.to_string());
        self.index().map(|_| ())
    }

    /// Route `tenant` to the shard it was moving to and clear its mark.
    pub fn finish_move(&mut self, tenant: &str) -> Result<()> {
        let Some(target) = self.moving.remove(tenant) else {
            return Err(Error::invalid(
                "routing map",
                format!("tenant `{tenant}` is not being moved"),
            ));
        };
        for tenants in self.shards.values_mut() {
            tenants.retain(|t| t != tenant);
        }
        self.shards
            .entry(target)
            .or_default()
            .push(tenant.to_string());
        self.index().map(|_| ())
    }

    /// Clear `tenant`'s move mark, leaving it on its source shard (a move that stopped).
    pub fn abandon_move(&mut self, tenant: &str) {
        self.moving.remove(tenant);
    }
}
