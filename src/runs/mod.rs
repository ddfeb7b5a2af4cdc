//! Runs, sessions and the hash-chained event ledger.
//!
//! * [`state`]: sessions, runs and their state machine (`pending → running → completed | failed |
//!   cancelled`), the per-tenant concurrent-runs limit and cancellation. Every transition is
//!   recorded in the ledger in the same transaction (and notified by the database trigger).
//! * [`ledger`]: append-only, per-run events sequenced under `pg_advisory_xact_lock` and chained
//!   with SHA-256 (formats v1 and v2 in [`ledger`]), batch and idempotent appends, appends inside
//!   a caller's transaction, signed checkpoints (HMAC-SHA-256 with a key held outside the
//!   database), streaming verification with and without the key, retention with chain anchors.
//! * [`lease`]: fenced run leases on database time.
//! * [`limits`]: size limits on every stored run input ([`RunLimits`], database hard caps).
//! * [`artifacts`]: versioned per-run key/value JSON artifacts and typed summaries.
//! * [`follow`]: [`follow::subscribe_run`], a gap-free stream of a run's new events.
//! * [`watch`]: [`watch::RunWatcher`], cancellation tokens that fire when a run is cancelled.
//! * [`output`]: live model output of running steps ([`subscribe_output`], [`listen_output`]),
//!   never written to the ledger.
//! * [`signal`]: signals to runs ([`signal_run`]) and decisions on tool calls waiting for
//!   approval ([`approve_step`], [`reject_step`]); they wake a waiting run on any instance.

use crate::error::Error;

pub mod artifacts;
pub mod follow;
pub mod lease;
pub mod ledger;
pub mod limits;
mod maintenance;
pub mod output;
mod session;
pub mod signal;
pub mod state;
mod transition;
pub mod watch;

pub use artifacts::{
    Artifact, Summary, SummaryContent, add_summary, artifact_history, get_artifact, list_artifacts,
    list_summaries, put_artifact,
};
pub use follow::subscribe_run;
pub use lease::{
    LeasedRun, RunLease, RunLeasing, acquire_run_lease, lease_run, release_run_lease,
    renew_run_lease,
};
pub use ledger::{
    AppendedEvent, ChainAnchor, ChainVerification, LedgerEvent, LedgerFormat, NewEvent,
    SignedVerification, append_event, append_events, event_hash, event_hash_v2, purge_run,
    read_events, verify_run_chain, verify_run_chain_signed, verify_run_chain_sql,
};
pub use limits::RunLimits;
pub use maintenance::{
    DeadInstanceLeases, RunRetention, RunRowRetention, StuckRuns, maintenance_steps,
};
pub use output::{
    OutputEvent, OutputListener, OutputPublisher, OutputSubscription, RunOutput, listen_output,
    subscribe_output,
};
pub use signal::{Decision, approve_step, decide_step, reject_step, signal_run};
pub use state::{
    LimitPolicy, NewRun, Run, RunFilter, RunOutcome, RunState, Session, StartOutcome, cancel_run,
    complete_run, create_run, fail_run, fail_stuck_runs, get_run, get_session, list_runs,
    new_session, resume_run, start_run,
};
pub use watch::RunWatcher;

pub(crate) use transition::{
    Started, complete_with_model_totals, resume_if_waiting, start_run_row,
};

/// Map the ledger's and leases' custom SQLSTATEs (PC001 lease lost, PC002 run not found, PC003
/// ledger closed, PC004 ledger written outside pgcrew) and the state-machine trigger's error to
/// typed errors.
pub(crate) fn map_db_error(e: Error, run: crate::ids::RunId) -> Error {
    use crate::sqlstate;
    let e = match e.into_driver() {
        Ok(e) => e,
        Err(other) => return other,
    };
    if let Some(db) = e.as_db_error() {
        match db.code().code() {
            sqlstate::LEASE_LOST => return Error::LeaseLost(db.message().to_string()),
            sqlstate::RUN_NOT_FOUND => return Error::not_found("run", run),
            sqlstate::LEDGER_CLOSED => {
                return Error::LedgerClosed {
                    run: run.to_string(),
                    message: db.message().to_string(),
                };
            }
            sqlstate::LEDGER_TAMPERED => {
                return Error::LedgerTampered {
                    run: run.to_string(),
                    message: db.message().to_string(),
                };
            }
            sqlstate::RUN_FINISHED => {
                return Error::RunFinished {
                    run: run.to_string(),
                    state: db.detail().unwrap_or("finished").to_string(),
                };
            }
            sqlstate::WAITING_FOR_OTHER_SIGNAL
            | sqlstate::NOT_WAITING_FOR_APPROVAL
            | sqlstate::WAIT_STEP_MISMATCH => {
                return Error::NotWaiting {
                    run: run.to_string(),
                    message: db.message().to_string(),
                };
            }
            sqlstate::CHECK_VIOLATION if db.hint() == Some("pgcrew_illegal_transition") => {
                return Error::IllegalTransition {
                    entity: "run",
                    id: run.to_string(),
                    from: "?".into(),
                    to: db.message().to_string(),
                };
            }
            _ => {}
        }
    }
    Error::from(e)
}
