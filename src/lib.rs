//! # pgcrew
//!
//! Durable, multi-tenant AI-agent runs coordinated entirely inside PostgreSQL.
//!
//! Services link this library and become *instances*; PostgreSQL is the only coordination point.
//! Everything that matters is a row, and the SQL surface (tables, views, functions, NOTIFY
//! channels in schema `pgcrew`) is public API.
//!
//! ```no_run
//! use std::time::Duration;
//! use pgcrew::{Client, ClientConfig};
//!
//! # async fn demo() -> pgcrew::Result<()> {
//! let config = ClientConfig::builder()
//!     .heartbeat_interval(Duration::from_secs(10))
//!     .migrate(true)
//!     .build()?;
//! let client = Client::connect("postgres://root@127.0.0.1:5432/test", config).await?;
//! client.start().await?;
//! println!("instance {} leader={}", client.instance_id(), client.is_leader());
//! client.stop().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

/// Include a query from `sql/queries/<name>.sql` (all SQL lives in `.sql` files). Exported
/// (hidden) for the `pgcrew` binary, whose queries live there too.
#[doc(hidden)]
#[macro_export]
macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/sql/queries/",
            $name,
            ".sql"
        ))
    };
}

/// Typed statement parameters for an [`db::Executor`]: `typed![&a, &b]` gives each value the
/// PostgreSQL type of its Rust type ([`db::SqlType`]); `typed![&a => Type::NAME]` names one.
/// The slice is always typed (even `typed![]`), so it can never be taken for the untyped
/// parameters of a tokio-postgres method of the same name (see [`db::Executor`]).
macro_rules! typed {
    ($($e:expr $(=> $t:expr)?),* $(,)?) => {
        $crate::db::typed_params(&[$(typed!(@one $e $(, $t)?)),*])
    };
    (@one $e:expr) => {
        (&$e as &(dyn ::tokio_postgres::types::ToSql + Sync), $crate::db::sql_type_of(&$e))
    };
    (@one $e:expr, $t:expr) => {
        (&$e as &(dyn ::tokio_postgres::types::ToSql + Sync), $t)
    };
}

/// Builder setters, one line each with its docs, that store their argument in a field of
/// `self.<part>` (what the builder collects) — `setters! { part; /// doc
/// name(arg: Type) => field = value; ... }` — or, without `part;`, of `self`.
macro_rules! setters {
    ($part:ident; $($(#[$doc:meta])* $name:ident($arg:ident: $ty:ty) => $field:ident = $value:expr;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $arg: $ty) -> Self {
                self.$part.$field = $value;
                self
            }
        )*
    };
    ($($(#[$doc:meta])* $name:ident($arg:ident: $ty:ty) => $field:ident = $value:expr;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $arg: $ty) -> Self {
                self.$field = $value;
                self
            }
        )*
    };
}

/// A leader maintenance step without settings: a unit struct, its name in reports, and the body
/// of its `run` (the fenced transaction `tx`, the pass's context `ctx`; returns the rows it
/// affected). `maintenance_step! { /// doc
/// Name, "report_name", |tx, ctx| { ... } }`.
macro_rules! maintenance_step {
    ($(#[$doc:meta])* $name:ident, $step:literal, |$tx:ident, $ctx:ident| $body:block) => {
        maintenance_step! {
            $(#[$doc])* $name, $step, probe: |_ctx| $crate::coord::maintenance::Probe::Always,
            |$tx, $ctx| $body
        }
    };
    ($(#[$doc:meta])* $name:ident, $step:literal, probe: |$pctx:ident| $probe:expr,
     |$tx:ident, $ctx:ident| $body:block) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name;

        #[async_trait::async_trait]
        impl $crate::coord::maintenance::MaintenanceStep for $name {
            fn name(&self) -> &'static str {
                $step
            }
            fn probe(
                &self,
                $pctx: &$crate::coord::maintenance::MaintenanceContext,
            ) -> $crate::coord::maintenance::Probe {
                $probe
            }
            async fn run(
                &self,
                $tx: &tokio_postgres::Transaction<'_>,
                $ctx: &$crate::coord::maintenance::MaintenanceContext,
            ) -> $crate::error::Result<u64> $body
        }
    };
}

/// The PostgreSQL side of a value type carried as `$inner`: `ToSql` / `FromSql` through `$inner`
/// (`to: |self| value` gives the `$inner` to send, `from: |v| result` builds the type from
/// the `$inner` read, an error naming a value it does not know), accepting exactly the listed
/// types, and the column / array types it binds as. (Not the `postgres-types` derive:
/// `transparent` would accept every type `$inner` accepts, such as `bpchar` and `name` for
/// `String`.)
macro_rules! sql_value {
    ($name:ty as $inner:ty, [$($accepts:ident),+], $sql:ident, $array:ident,
     to: |$s:ident| $to:expr, from: |$v:ident| $from:expr $(,)?) => {
        impl postgres_types::ToSql for $name {
            fn to_sql(
                &self,
                ty: &postgres_types::Type,
                out: &mut postgres_types::private::BytesMut,
            ) -> std::result::Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
                let $s = self;
                <$inner as postgres_types::ToSql>::to_sql(&$to, ty, out)
            }
            postgres_types::accepts!($($accepts),+);
            postgres_types::to_sql_checked!();
        }

        impl<'a> postgres_types::FromSql<'a> for $name {
            fn from_sql(
                ty: &postgres_types::Type,
                raw: &'a [u8],
            ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
                let $v = <$inner as postgres_types::FromSql>::from_sql(ty, raw)?;
                $from
            }
            postgres_types::accepts!($($accepts),+);
        }

        impl crate::db::SqlType for $name {
            const TYPE: postgres_types::Type = postgres_types::Type::$sql;
        }

        impl crate::db::SqlArrayElement for $name {
            const ARRAY: postgres_types::Type = postgres_types::Type::$array;
        }
    };
}

pub mod agent;
pub mod client;
pub mod config;
pub mod coord;
pub mod db;
pub mod doctor;
pub mod error;
pub mod ids;
pub mod kernel;
pub mod ledger_key;
pub mod metrics;
pub mod model;
pub mod queue;
pub mod runs;
pub mod schedule;
pub mod shard;
pub mod sqlstate;
mod sync;
pub mod telemetry;
pub mod tenancy;
pub mod ui;
pub mod vocab;

pub use agent::{AgentDef, AgentRuntime, Tool, ToolRegistry};
pub use client::Client;
pub use config::{ClientConfig, ClientConfigBuilder};
pub use coord::notify::{Event, EventKind, Subscription};
pub use db::Db;
pub use error::{Error, Result};
pub use ids::{ClaimToken, InstanceId, PoolId, RunId, SessionId, TaskId, TenantId};
pub use kernel::{Harness, Kernel, ReplayPolicy, RunScope};
pub use ledger_key::LedgerKey;
pub use model::{ModelPort, ModelRequest, ModelResponse, OpenAiModel, ScriptedModel};
pub use queue::{NewTask, Priority, TaskOutcome, WorkerPool};
pub use shard::{RoutingMap, ShardedClient};
pub use tenancy::{BudgetStatus, PriceTable, TenantContext};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// This crate's version, recorded with every instance.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
