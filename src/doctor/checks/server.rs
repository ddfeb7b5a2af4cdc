//! Server checks: version, migrations, connection slots, timeouts, autovacuum of the tasks
//! table.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::{Ctx, human, human_ms, human_secs, percent};
use crate::doctor::{CheckId, Finding, MIN_SERVER_MAJOR, NEWEST_KNOWN_SERVER_MAJOR};
use crate::error::{Error, Result};

pub(super) fn server_version(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::ServerVersion;
    let num = ctx.int("server_version_num")?;
    let text = ctx.required("server_version")?.value.clone();
    let major = i32::try_from(num / 10_000).unwrap_or(i32::MAX);
    Ok(if major < MIN_SERVER_MAJOR {
        Finding::fail(
            check,
            format!(
                "PostgreSQL {text} (major {major}): pgcrew needs PostgreSQL {MIN_SERVER_MAJOR} or newer"
            ),
            format!(
                "upgrade the server to PostgreSQL {MIN_SERVER_MAJOR} or newer (pg_upgrade, or a \
                 dump and restore); pgcrew's schema uses security_invoker views"
            ),
        )
    } else if major > NEWEST_KNOWN_SERVER_MAJOR {
        Finding::warn(
            check,
            format!(
                "PostgreSQL {text} (major {major}) is newer than any major this pgcrew knows \
                 ({MIN_SERVER_MAJOR} to {NEWEST_KNOWN_SERVER_MAJOR})"
            ),
            "run the test suite against this server before relying on it, or upgrade pgcrew",
        )
    } else {
        Finding::pass(
            check,
            format!(
                "PostgreSQL {text} (major {major}; pgcrew runs on {MIN_SERVER_MAJOR} to {NEWEST_KNOWN_SERVER_MAJOR})"
            ),
        )
    })
}

/// The schema version, classified as [`Db::check_schema`](crate::Db::check_schema) does (read on
/// the doctor's connection: the doctor's pool has no second one).
async fn schema_version(client: &Client, latest: i64) -> Result<i64> {
    let exists: bool = client
        .query_one(sql!("db/schema_history_exists"), &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Err(Error::SchemaMissing);
    }
    let v: i64 = client
        .query_one(sql!("db/schema_version"), &[])
        .await?
        .try_get(0)?;
    match v {
        v if v > latest => Err(Error::SchemaTooNew {
            database: v,
            supported: latest,
            crate_version: crate::VERSION,
        }),
        v if v < latest => Err(Error::SchemaOutdated {
            database: v,
            required: latest,
        }),
        v => Ok(v),
    }
}

pub(super) async fn migrations(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::Migrations;
    let latest = crate::db::latest_version();
    Ok(match schema_version(ctx.client, latest).await {
        Ok(v) => Finding::pass(
            check,
            format!("schema at version {v}, the newest this pgcrew knows"),
        ),
        Err(Error::SchemaMissing) => Finding::fail(
            check,
            "the pgcrew schema is not installed in this database",
            "run `pgcrew migrate` (or build one client with `.migrate(true)`) as the role that \
             will own the schema",
        ),
        Err(Error::SchemaOutdated { database, required }) => Finding::fail(
            check,
            format!("schema at version {database}; this pgcrew needs version {required}"),
            "run `pgcrew migrate` with this pgcrew (migrations are idempotent and safe while \
             instances run)",
        ),
        Err(Error::SchemaTooNew {
            database,
            supported,
            crate_version,
        }) => Finding::warn(
            check,
            format!(
                "schema at version {database}, newer than this pgcrew ({crate_version}) knows \
                 (up to {supported}); its other checks may misread the schema"
            ),
            format!(
                "run the doctor of the pgcrew version the deployment runs (schema version \
                 {database}; this one knows {latest})"
            ),
        ),
        Err(e) => return Err(e),
    })
}

pub(super) async fn max_connections(ctx: &mut Ctx<'_>) -> Result<Finding> {
    let check = CheckId::MaxConnections;
    let max = ctx.int("max_connections")?;
    let superuser_reserved = ctx.int("superuser_reserved_connections")?;
    let reserved = match ctx.setting("reserved_connections")? {
        Some(_) => ctx.int("reserved_connections")?,
        None => 0,
    };
    let usable = (max - superuser_reserved - reserved).max(0);
    let per_instance = i64::from(ctx.opts.connections_per_instance);
    // Without the instances table (no schema, no privilege) the live connections still count.
    let instances = match ctx.instances().await {
        Ok(i) => Some(i.len() as i64),
        Err(_) => None,
    };
    let prefix = ctx.opts.application_name_prefix.clone();
    let headroom = ctx.opts.connection_headroom;
    let max_items = ctx.opts.max_items;
    let backends = ctx.backends().await?;
    let mut live_pgcrew = 0i64;
    let mut others = 0i64;
    let mut groups: BTreeMap<(String, String), i64> = BTreeMap::new();
    for b in backends.iter().filter(|b| b.is_client()) {
        if b.is_pgcrew(&prefix) {
            live_pgcrew += 1;
            let from = match (&b.client_addr, b.unix_socket()) {
                (_, true) => "a unix socket".to_string(),
                (Some(a), false) => a.clone(),
                (None, false) => "an address hidden from this role".to_string(),
            };
            *groups
                .entry((b.application_name.clone(), from))
                .or_default() += 1;
        } else {
            others += 1;
        }
    }
    let budget = instances.map(|n| n * per_instance).unwrap_or(0);
    let needed = budget.max(live_pgcrew);
    let total = needed + others;
    let items: Vec<String> = groups
        .into_iter()
        .map(|((app, from), n)| format!("{app} from {from}: {n} open"))
        .collect();
    let instances_text = match instances {
        Some(n) => format!("{n} instance(s) x {per_instance} = {budget}"),
        None => "the instances table could not be read".to_string(),
    };
    let message = format!(
        "max_connections = {max} ({usable} usable: {superuser_reserved} reserved for superusers, \
         {reserved} reserved); pgcrew's budget: {instances_text} (open now: {live_pgcrew}); \
         other sessions open now: {others}; in use at most {total} of {usable} ({}), headroom \
         kept: {:.0} %",
        percent(total as f64, usable as f64),
        headroom * 100.0
    );
    let advice = "raise max_connections (takes a restart), lower the instances' connection \
                  budget (pool_size), or put PgBouncer in transaction mode in front of the pools \
                  (LISTEN stays direct)";
    Ok(if total > usable {
        Finding::fail(
            check,
            format!(
                "{message}: the server refuses connections before every instance has its budget"
            ),
            advice,
        )
        .items(items, max_items)
    } else if (total as f64) > (usable as f64) * (1.0 - headroom) {
        Finding::warn(
            check,
            format!("{message}: less than the headroom is left"),
            advice,
        )
        .items(items, max_items)
    } else {
        Finding::pass(check, message).items(items, max_items)
    })
}

pub(super) fn idle_in_transaction(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::IdleInTransactionTimeout;
    let ms = ctx.millis("idle_in_transaction_session_timeout")?;
    let min = ctx.opts.min_idle_in_transaction_timeout;
    let advice = "set it for the role pgcrew connects as, e.g. `ALTER ROLE <pgcrew role> SET \
                  idle_in_transaction_session_timeout = '60s'` (or for the database, or in \
                  postgresql.conf)";
    Ok(if ms == 0 {
        Finding::warn(
            check,
            "idle_in_transaction_session_timeout is off: a session left idle inside a \
             transaction (a crashed or hung client) keeps its locks and row versions until \
             someone ends it, and vacuum of pgcrew.tasks cannot remove dead tuples behind it",
            advice,
        )
    } else if (ms as u128) < min.as_millis() {
        Finding::warn(
            check,
            format!(
                "idle_in_transaction_session_timeout = {} is below {}: a busy client pausing \
                 between the statements of one transaction loses its connection",
                human_ms(ms),
                human(min)
            ),
            advice,
        )
    } else {
        Finding::pass(
            check,
            format!("idle_in_transaction_session_timeout = {}", human_ms(ms)),
        )
    })
}

pub(super) fn statement_timeout(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::StatementTimeout;
    let ms = ctx.millis("statement_timeout")?;
    let min = ctx.opts.min_statement_timeout;
    Ok(if ms == 0 {
        Finding::pass(
            check,
            "statement_timeout is off (pgcrew's statements are short; maintenance works in \
             batches)",
        )
    } else if (ms as u128) < min.as_millis() {
        Finding::warn(
            check,
            format!(
                "statement_timeout = {} is below {}: migrations, retention batches and large \
                 claims can be cancelled half-way and retried forever",
                human_ms(ms),
                human(min)
            ),
            format!(
                "raise it to at least {} for the role pgcrew connects as (`ALTER ROLE <pgcrew \
                 role> SET statement_timeout = '30s'`), or turn it off for that role",
                human(min)
            ),
        )
    } else {
        Finding::pass(check, format!("statement_timeout = {}", human_ms(ms)))
    })
}

fn reloption_off(options: &[String], name: &str) -> bool {
    options.iter().any(|o| {
        o.split_once('=').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case(name)
                && matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "false" | "off" | "no" | "0" | "f" | "n"
                )
        })
    })
}

pub(super) async fn tasks_autovacuum(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::TasksAutovacuum;
    let row = ctx.one(sql!("doctor/tasks_autovacuum")).await?;
    let reloptions: Vec<String> = row.try_get("reloptions")?;
    let toast: Vec<String> = row.try_get("toast_reloptions")?;
    let live: i64 = row.try_get("n_live_tup")?;
    let dead: i64 = row.try_get("n_dead_tup")?;
    let vacuumed: Option<f64> = row.try_get("vacuumed_s_ago")?;
    let autovacuum_on = ctx.on("autovacuum")?;
    let track_counts = ctx.on("track_counts")?;
    let mut off = Vec::new();
    if !autovacuum_on {
        off.push("autovacuum = off on the server".to_string());
    }
    if !track_counts {
        off.push("track_counts = off on the server (autovacuum needs it)".to_string());
    }
    if reloption_off(&reloptions, "autovacuum_enabled") {
        off.push("pgcrew.tasks has autovacuum_enabled = false".to_string());
    }
    if reloption_off(&toast, "autovacuum_enabled") {
        off.push("pgcrew.tasks's TOAST table has autovacuum_enabled = false".to_string());
    }
    let last = match vacuumed {
        Some(s) => format!("last vacuumed {} ago", human_secs(s)),
        None => "never vacuumed since the statistics were reset".to_string(),
    };
    let figures = format!("{live} live and {dead} dead tuples, {last}");
    if !off.is_empty() {
        return Ok(Finding::fail(
            check,
            format!(
                "autovacuum cannot run on pgcrew.tasks ({figures}): every claim and \
                 acknowledgement leaves a dead row version, and the table and its indexes bloat \
                 until claims slow down",
            ),
            "turn it back on: `ALTER TABLE pgcrew.tasks RESET (autovacuum_enabled)` (and \
             `toast.autovacuum_enabled`), `autovacuum = on` and `track_counts = on` in \
             postgresql.conf",
        )
        .items(off, ctx.opts.max_items));
    }
    let over = dead >= ctx.opts.min_dead_tuples
        && (dead as f64) > ctx.opts.max_dead_tuple_ratio * (live.max(0) as f64);
    Ok(if over {
        Finding::warn(
            check,
            format!(
                "{figures}: more than {:.0} % of the live tuples are dead; autovacuum is not \
                 keeping up",
                ctx.opts.max_dead_tuple_ratio * 100.0
            ),
            "look for what holds vacuum back: long transactions and idle-in-transaction \
             sessions (pg_stat_activity.xact_start), abandoned replication slots and prepared \
             transactions; then `VACUUM (VERBOSE) pgcrew.tasks`",
        )
    } else {
        Finding::pass(check, format!("autovacuum on; {figures}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloptions_turning_autovacuum_off_are_recognised() {
        // (reloptions, whether they turn autovacuum_enabled off)
        let cases: [(&[&str], bool); 4] = [
            (&["autovacuum_enabled=false"], true),
            (&["fillfactor=70", "autovacuum_enabled=off"], true),
            (&["autovacuum_enabled=true"], false),
            (&["fillfactor=70"], false),
        ];
        for (options, off) in cases {
            let options: Vec<String> = options.iter().map(|s| s.to_string()).collect();
            assert_eq!(
                reloption_off(&options, "autovacuum_enabled"),
                off,
                "{options:?}"
            );
        }
    }
}
