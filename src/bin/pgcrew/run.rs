//! `pgcrew run list|tail|status|verify-ledger|summaries|artifacts|signal|approve|reject|cancel|submit`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use futures_util::StreamExt;
use pgcrew::coord::notify::{Notifier, NotifierConfig};
use pgcrew::runs::{self, LedgerEvent, RunFilter, RunState};
use pgcrew::{LedgerKey, Result, RunId, TenantId};

use crate::output::{connect, print_json, print_rows, print_table};

/// `pgcrew run` subcommands.
#[derive(Debug, Subcommand)]
pub enum RunCmd {
    /// List runs, newest first (one run id per line without --json).
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<TenantId>,
        /// Only this state (pending, running, waiting, completed, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a run's ledger events: `seq<TAB>timestamp<TAB>event_type<TAB>step_key`.
    Tail {
        /// The run id.
        run: RunId,
        /// Keep streaming new events until the run has finished (or Ctrl-C).
        #[arg(long)]
        follow: bool,
        /// Only events after this seq.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Print one JSON object per event (JSON Lines, with payload and hashes).
        #[arg(long)]
        json: bool,
    },
    /// Show a run's state, usage and lease.
    Status {
        /// The run id.
        run: RunId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify a run's ledger: prints `valid ...` (exit 0) or `invalid at seq N: ...` (exit 1).
    ///
    /// With the ledger key (--key-file, or PGCREW_LEDGER_KEY / PGCREW_LEDGER_KEY_FILE) the signed
    /// checkpoints are checked too, which exposes a full rewrite; without it, it is not covered.
    VerifyLedger {
        /// The run id.
        run: RunId,
        /// Also check the chain with the SQL function pgcrew.verify_run_chain (without a key: instead
        /// of the streaming Rust verifier).
        #[arg(long)]
        sql: bool,
        /// A file holding the ledger key (a trailing newline is ignored). Default: the key in
        /// PGCREW_LEDGER_KEY or the file named by PGCREW_LEDGER_KEY_FILE.
        #[arg(long, value_name = "FILE")]
        key_file: Option<std::path::PathBuf>,
    },
    /// List a run's summaries, newest first.
    Summaries {
        /// The run id.
        run: RunId,
        /// Only this summary type.
        #[arg(long = "type")]
        summary_type: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the latest version of each of a run's artifacts.
    Artifacts {
        /// The run id.
        run: RunId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a signal to a run: a run waiting for it resumes on any instance; a run not waiting
    /// yet keeps it for its next wait on that name.
    Signal(crate::signal::SignalArgs),
    /// Approve a tool call waiting for approval (the tool then runs).
    Approve(crate::signal::DecideArgs),
    /// Reject a tool call waiting for approval (the model is told; the tool is not run).
    Reject(crate::signal::DecideArgs),
    /// Cancel a pending, running or waiting run (the instance working on it stops promptly).
    Cancel {
        /// The run id.
        run: RunId,
        /// Why.
        #[arg(long, default_value = "cancelled from the CLI")]
        reason: String,
    },
    /// Submit a run of an agent (through pgcrew.submit_run) and print its id; with --wait exit 0
    /// when it completes, 1 when it fails or is cancelled.
    Submit(crate::submit::SubmitArgs),
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
}

fn print_event(e: &LedgerEvent, json: bool) {
    if json {
        match serde_json::to_string(e) {
            Ok(line) => println!("{line}"),
            Err(err) => eprintln!("warning: cannot encode event {}: {err}", e.seq),
        }
        return;
    }
    println!(
        "{}\t{}\t{}\t{}",
        e.seq,
        e.created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        e.event_type,
        e.step_key.as_deref().unwrap_or("")
    );
}

/// Execute a `pgcrew run` subcommand.
pub async fn exec(dsn: Option<String>, cmd: RunCmd) -> Result<ExitCode> {
    // Validate arguments before connecting.
    if let RunCmd::List { state: Some(s), .. } = &cmd {
        s.parse::<RunState>()?;
    }
    if let RunCmd::Signal(a) = &cmd {
        crate::signal::parse_payload(a.payload.as_deref())?;
    }
    // The ledger key, read before connecting (a bad key is a usage error).
    let key = match &cmd {
        RunCmd::VerifyLedger {
            key_file: Some(f), ..
        } => Some(LedgerKey::from_file(f)?),
        RunCmd::VerifyLedger { .. } => LedgerKey::from_env()?,
        _ => None,
    };
    let db = connect(dsn).await?;
    match cmd {
        RunCmd::List {
            tenant,
            state,
            limit,
            json,
        } => {
            let filter = RunFilter {
                tenant,
                state: state.map(|s| s.parse()).transpose()?,
                limit,
            };
            let list = runs::list_runs(&db, &filter).await?;
            if json {
                print_json(&list)?;
            } else {
                for r in list {
                    println!("{}", r.id);
                }
            }
        }
        RunCmd::Tail {
            run,
            follow,
            after,
            json,
        } => {
            runs::get_run(&db, run).await?;
            let mut last = after;
            loop {
                let batch = runs::read_events(&db, run, last, 1000).await?;
                let n = batch.len();
                for e in &batch {
                    print_event(e, json);
                    last = e.seq;
                }
                if n < 1000 {
                    break;
                }
            }
            if follow {
                follow_run(&db, run, last, json).await?;
            }
        }
        RunCmd::Status { run, json } => {
            let r = runs::get_run(&db, run).await?;
            if json {
                print_json(&r)?;
            } else {
                let rows = vec![
                    vec!["id".into(), r.id.to_string()],
                    vec!["tenant".into(), r.tenant_id.to_string()],
                    vec!["agent".into(), opt(&r.agent_name)],
                    vec!["state".into(), r.state.to_string()],
                    vec!["instance".into(), opt(&r.instance_id)],
                    vec!["stop_reason".into(), opt(&r.stop_reason)],
                    vec!["input_tokens".into(), r.input_tokens.to_string()],
                    vec!["output_tokens".into(), r.output_tokens.to_string()],
                    vec!["cost_usd".into(), format!("{:.6}", r.cost_usd)],
                    vec!["error_type".into(), opt(&r.error_type)],
                    vec!["error_message".into(), opt(&r.error_message)],
                    vec!["cancel_reason".into(), opt(&r.cancel_reason)],
                    vec![
                        "lease".into(),
                        match (&r.lease_owner, r.lease_valid) {
                            (Some(o), true) => format!("{o} (token {})", r.lease_token),
                            (Some(o), false) => format!("{o} (expired, token {})", r.lease_token),
                            (None, _) => "-".into(),
                        },
                    ],
                    vec!["created_at".into(), r.created_at.to_rfc3339()],
                    vec![
                        "started_at".into(),
                        r.started_at.map(|t| t.to_rfc3339()).unwrap_or("-".into()),
                    ],
                    vec![
                        "finalized_at".into(),
                        r.finalized_at.map(|t| t.to_rfc3339()).unwrap_or("-".into()),
                    ],
                ];
                print_table(&["field", "value"], &rows);
            }
        }
        RunCmd::VerifyLedger { run, sql, .. } => {
            return verify_ledger(&db, run, sql, key).await;
        }
        RunCmd::Summaries {
            run,
            summary_type,
            limit,
            json,
        } => {
            let list = runs::list_summaries(&db, run, summary_type.as_deref(), limit).await?;
            let headers = ["id", "type", "created_at", "content"];
            print_rows(json, &list, None, &headers, |s| {
                vec![
                    s.id.to_string(),
                    s.summary_type.clone(),
                    s.created_at.to_rfc3339(),
                    match &s.content {
                        runs::SummaryContent::Text(t) => t.replace('\n', " "),
                        runs::SummaryContent::Json(j) => j.to_string(),
                    },
                ]
            })?;
        }
        RunCmd::Artifacts { run, json } => {
            let list = runs::list_artifacts(&db, run).await?;
            let headers = ["key", "version", "created_at", "value"];
            print_rows(json, &list, None, &headers, |a| {
                vec![
                    a.key.clone(),
                    a.version.to_string(),
                    a.created_at.to_rfc3339(),
                    a.value.to_string(),
                ]
            })?;
        }
        RunCmd::Submit(args) => return crate::submit::exec(&db, args).await,
        RunCmd::Signal(a) => crate::signal::signal(&db, a).await?,
        RunCmd::Approve(a) => crate::signal::decide(&db, a, runs::Decision::Approved).await?,
        RunCmd::Reject(a) => crate::signal::decide(&db, a, runs::Decision::Rejected).await?,
        RunCmd::Cancel { run, reason } => {
            let r = runs::cancel_run(&db, run, &reason).await?;
            println!("{} {}", r.id, r.state);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `pgcrew run verify-ledger`: one line `valid ...` (exit 0) or `invalid at seq N: ...` (exit 1),
/// then, without a key, a line saying what is not covered.
async fn verify_ledger(
    db: &pgcrew::Db,
    run: RunId,
    sql: bool,
    key: Option<LedgerKey>,
) -> Result<ExitCode> {
    let invalid = |v: &runs::ChainVerification, problem: Option<&str>| {
        let problem = problem
            .or(v.problem.as_deref())
            .unwrap_or("the ledger does not verify");
        match v.first_bad_seq {
            Some(seq) => println!("invalid at seq {seq}: {problem}"),
            None => println!("invalid: {problem}"),
        }
        Ok(ExitCode::from(1))
    };
    let chain = if sql {
        runs::verify_run_chain_sql(db, run).await?
    } else {
        runs::verify_run_chain(db, run).await?
    };
    if !chain.valid {
        return invalid(&chain, None);
    }
    let events = match &chain.anchor {
        Some(a) => format!(
            "ledger purged ({}): {} events, chain anchor at seq {}",
            a.reason, a.event_count, a.last_seq
        ),
        None => format!("{} events", chain.checked),
    };
    let Some(key) = key else {
        println!(
            "valid: {events}, chain intact and ending at the recorded head (ledger format v{})",
            chain.format
        );
        println!(
            "not covered without the ledger key: a full rewrite with recomputed hashes and head; pass --key-file (or set PGCREW_LEDGER_KEY / PGCREW_LEDGER_KEY_FILE) to check the signed checkpoints"
        );
        return Ok(ExitCode::SUCCESS);
    };
    let v = runs::verify_run_chain_signed(db, run, &key).await?;
    if !v.valid {
        let problem = v.problem.clone();
        return invalid(&v.chain, problem.as_deref());
    }
    let head = v.chain.head_seq;
    match (v.state.is_terminal(), v.signed_seq) {
        (true, _) => println!(
            "valid: {events}, chain intact, run {}, head seq {head} covered by a signed checkpoint ({} checkpoints, ledger format v{})",
            v.state, v.checkpoints, v.chain.format
        ),
        (false, Some(s)) => println!(
            "valid: {events}, chain intact, run {}: signed up to seq {s} of {head} (events after seq {s} are covered by the next checkpoint)",
            v.state
        ),
        (false, None) => println!(
            "valid: {events}, chain intact, run {}: nothing signed yet (head seq {head}); the run is signed when it finishes",
            v.state
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Stream new events until the run is finished and fully printed, or Ctrl-C.
async fn follow_run(db: &pgcrew::Db, run: RunId, after: i64, json: bool) -> Result<()> {
    let notifier = Notifier::new(1024);
    let listener = notifier.spawn_listener(NotifierConfig {
        pg_config: db.config().clone(),
        poll_only: false,
        poll_interval: Duration::from_secs(2),
        instance: None,
    });
    let stream = runs::subscribe_run(
        db.clone(),
        &notifier,
        run,
        after,
        Duration::from_millis(500),
    );
    let mut stream = std::pin::pin!(stream);
    let mut last = after;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    let result = loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(e)) => { last = e.seq; print_event(&e, json); }
                Some(Err(e)) => eprintln!("warning: {e}; retrying"),
                None => break Ok(()),
            },
            _ = check.tick() => {
                let r = runs::get_run(db, run).await?;
                if r.state.is_terminal() && runs::read_events(db, run, last, 1).await?.is_empty() {
                    break Ok(());
                }
            }
            _ = tokio::signal::ctrl_c() => break Ok(()),
        }
    };
    listener.stop().await;
    result
}
