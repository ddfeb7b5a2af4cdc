//! Ledger checks: signed checkpoints of finished runs, and their signatures.

use super::{Ctx, human, read_rows};
use crate::doctor::{CheckId, DoctorOptions, Finding};
use crate::error::Result;
use crate::ids::RunId;

#[derive(postgres_from_row::FromRow)]
struct FinishedRun {
    #[from_row(rename = "id")]
    run: RunId,
    state: String,
    #[from_row(rename = "ledger_head_seq")]
    head_seq: i64,
    #[from_row(rename = "ledger_head_hash")]
    head_hash: Option<Vec<u8>>,
    mac: Option<Vec<u8>>,
}

async fn finished_runs(ctx: &Ctx<'_>) -> Result<Vec<FinishedRun>> {
    let window = crate::config::interval_micros(ctx.opts.ledger_window);
    read_rows(
        ctx.client,
        sql!("doctor/recent_checkpoints"),
        &[&window, &ctx.opts.ledger_sample],
    )
    .await
}

fn window_text(opts: &DoctorOptions) -> String {
    format!(
        "in the last {} (newest {} at most)",
        human(opts.ledger_window),
        opts.ledger_sample
    )
}

pub(super) async fn ledger_checkpoints(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::LedgerCheckpoints;
    let runs = finished_runs(ctx).await?;
    let window = window_text(ctx.opts);
    if runs.is_empty() {
        return Ok(Finding::pass(
            check,
            format!("no run finished {window}: no checkpoint to look for"),
        ));
    }
    let unsigned: Vec<&FinishedRun> = runs.iter().filter(|r| r.mac.is_none()).collect();
    if unsigned.is_empty() {
        return Ok(Finding::pass(
            check,
            format!(
                "all {} run(s) finished {window} have a signed checkpoint at their ledger head",
                runs.len()
            ),
        ));
    }
    let what = if unsigned.len() == runs.len() {
        "none of them is signed: the instances run without the ledger key".to_string()
    } else {
        format!(
            "{} of them are not: some process finishing runs has no ledger key",
            unsigned.len()
        )
    };
    Ok(Finding::fail(
        check,
        format!("{} run(s) finished {window}; {what}", runs.len()),
        "give every instance (and every tool that finishes runs, e.g. `pgcrew run cancel`) the \
         ledger key: PGCREW_LEDGER_KEY_FILE=<file> (or PGCREW_LEDGER_KEY, or \
         ClientConfig::ledger_key), at least 32 random bytes (`openssl rand -hex 32`). Without \
         a signed checkpoint a full rewrite of a run's ledger (hashes recomputed) goes unnoticed",
    )
    .items(
        unsigned
            .iter()
            .map(|r| {
                format!(
                    "run {} ({}): head seq {} not signed",
                    r.run, r.state, r.head_seq
                )
            })
            .collect(),
        ctx.opts.max_items,
    ))
}

pub(super) async fn ledger_signatures(ctx: &Ctx<'_>) -> Result<Finding> {
    let check = CheckId::LedgerSignatures;
    let Some(key) = &ctx.opts.ledger_key else {
        return Ok(Finding::warn(
            check,
            "not verified: the doctor was given no ledger key",
            "pass the key the instances sign with: --key-file <file>, or PGCREW_LEDGER_KEY / \
             PGCREW_LEDGER_KEY_FILE",
        ));
    };
    let runs = finished_runs(ctx).await?;
    let signed: Vec<&FinishedRun> = runs.iter().filter(|r| r.mac.is_some()).collect();
    let window = window_text(ctx.opts);
    if signed.is_empty() {
        return Ok(Finding::pass(
            check,
            format!("no signed checkpoint of a run finished {window} to verify"),
        ));
    }
    let bad: Vec<&&FinishedRun> = signed
        .iter()
        .filter(|r| match (&r.head_hash, &r.mac) {
            (Some(h), Some(m)) => !key.verify(r.run, r.head_seq, h, m),
            _ => true,
        })
        .collect();
    Ok(if bad.is_empty() {
        Finding::pass(
            check,
            format!(
                "the final checkpoints of {} run(s) finished {window} verify with the given key",
                signed.len()
            ),
        )
    } else {
        Finding::fail(
            check,
            format!(
                "{} of {} checkpoint(s) of runs finished {window} do not verify with the given \
                 key: signed with another key, or forged",
                bad.len(),
                signed.len()
            ),
            "check that the doctor and the instances use the same key; then verify each run \
             named with `pgcrew run verify-ledger <run> --key-file <file>`",
        )
        .items(
            bad.iter()
                .map(|r| {
                    format!(
                        "run {} ({}): checkpoint at seq {}",
                        r.run, r.state, r.head_seq
                    )
                })
                .collect(),
            ctx.opts.max_items,
        )
    })
}
