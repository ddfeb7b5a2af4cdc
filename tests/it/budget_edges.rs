//! Issue #15, budget and money edges: the completion cap sent is the one reserved for, the prompt
//! estimate is an upper bound for any script, overruns are recorded and flagged, the database
//! refuses NaN / infinite / negative money, non-ASCII model names do not panic, and capability
//! denials inside agent runs follow the agent's policy.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgcrew::agent::{
    AgentDef, AgentRuntime, CapabilityDenialPolicy, Tool, ToolRegistry, register_agent,
};
use pgcrew::kernel::{DEFAULT_RESERVE_MAX_TOKENS, Kernel, ReplayPolicy, RunScope};
use pgcrew::model::{
    ModelRequest, OpenAiConfig, OpenAiModel, PriceTable, ScriptedModel, ScriptedReply,
};
use pgcrew::runs::{self, NewRun, RunState};
use pgcrew::tenancy::{self, BudgetStatus, ReserveRequest};
use pgcrew::{Db, Error, RunId, TenantId};
use serde_json::{Value, json};
use tokio_postgres::NoTls;

use crate::common::{agent_runtime, count, ledger_events, scalar_on, submit_run, tenant, test_db};
use crate::mock_openai::read_json_request;

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

async fn new_run(db: &Db, tenant: &TenantId) -> RunId {
    runs::create_run(db, NewRun::new(tenant.clone()))
        .await
        .unwrap()
}

async fn events(db: &Db, run: RunId) -> Vec<(String, Option<String>, Value)> {
    ledger_events(db, run).await
}

/// What a byte-level BPE tokenizer (GPT, Llama 3, ...) can produce at most for the messages of
/// a chat completions body: one token per UTF-8 byte of text, plus OpenAI's documented framing
/// (3 tokens per message, 3 to prime the reply) rounded up to 4 per message. Computed from the
/// wire body, independently of pgcrew's estimator.
fn wire_prompt_bound(body: &Value) -> u64 {
    let mut tokens = 3u64;
    for m in body["messages"].as_array().into_iter().flatten() {
        tokens += 4;
        tokens += m["role"].as_str().map_or(0, str::len) as u64;
        if let Some(c) = m["content"].as_str() {
            tokens += c.len() as u64;
        }
        for c in m["tool_calls"].as_array().into_iter().flatten() {
            tokens += c["function"]["name"].as_str().map_or(0, str::len) as u64;
            tokens += c["function"]["arguments"].as_str().map_or(0, str::len) as u64;
        }
    }
    tokens
}

/// What the edge mock answers with.
#[derive(Clone, Copy, Debug)]
enum Usage {
    /// Prompt tokens = [`wire_prompt_bound`], completion tokens = the cap sent (or
    /// `UNCAPPED_COMPLETION` when the request carries none: a provider's own default).
    Edge,
    /// Reports `factor` times the edge completion tokens (a provider that ignores the cap).
    Overrun(u64),
}

/// The completion a provider may produce when no cap is sent (OpenAI's gpt-4o output limit).
const UNCAPPED_COMPLETION: u64 = 16_384;

/// An OpenAI-compatible server on loopback answering every request at once (each connection
/// on its own task), recording every body.
struct EdgeMock {
    base_url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EdgeMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn edge_mock(usage: Usage) -> EdgeMock {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Some(body) = read_json_request(&mut stream).await else {
                    return;
                };
                let cap = body["max_tokens"]
                    .as_u64()
                    .or_else(|| body["max_completion_tokens"].as_u64());
                let completion = cap.unwrap_or(UNCAPPED_COMPLETION);
                let completion = match usage {
                    Usage::Edge => completion,
                    Usage::Overrun(f) => completion * f,
                };
                let prompt = wire_prompt_bound(&body);
                let model = body["model"].as_str().unwrap_or("m").to_string();
                seen.lock().unwrap().push(body);
                let out = json!({
                    "id": "chatcmpl-edge", "object": "chat.completion", "created": 1_700_000_000u32,
                    "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                 "finish_reason": "length"}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion}
                })
                .to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                    out.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    EdgeMock {
        base_url,
        bodies,
        task,
    }
}

fn openai(base_url: &str) -> Arc<OpenAiModel> {
    let config = OpenAiConfig::builder()
        .base_url(base_url)
        .max_retries(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    Arc::new(OpenAiModel::new(config))
}

const EDGE_MODEL: &str = "edge-model";

fn edge_prices() -> PriceTable {
    // USD per 1M tokens: prompt 3, completion 15.
    PriceTable::empty().with(EDGE_MODEL, 3.0, 15.0).unwrap()
}

/// Text in one of several scripts: Latin, CJK, emoji, Arabic, Cyrillic, Devanagari, mixed.
fn script_text(rng: &mut fastrand::Rng, chars: usize) -> (String, &'static str) {
    const SCRIPTS: &[(&str, &str)] = &[
        ("latin", "the quick brown fox jumps over a lazy dog "),
        ("cjk", "预算保证在边缘也成立東京の天気は晴れです한국어문장"),
        ("emoji", "🤖💸📈🧾🔥🚀👩‍💻🏳️‍🌈"),
        ("arabic", "الميزانية لا تتجاوز الحد أبدا "),
        ("cyrillic", "бюджет никогда не превышает лимит "),
        ("devanagari", "बजट कभी सीमा से अधिक नहीं होता "),
        ("mixed", "aé预🤖ب б क\u{301}\u{200d}"),
    ];
    let (name, alphabet) = SCRIPTS[rng.usize(..SCRIPTS.len())];
    let letters: Vec<char> = alphabet.chars().collect();
    let text = (0..chars.max(1))
        .map(|_| letters[rng.usize(..letters.len())])
        .collect();
    (text, name)
}

// ------------------------------------------------------------------------------------------
// 1. Spending can pass the budget
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn unset_max_tokens_sends_the_reserved_cap_to_the_provider() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", &[], Some(100.0)).await;
    let run = new_run(&t.db, &acme).await;
    let mock = edge_mock(Usage::Edge).await;
    let k = Kernel::new(t.db.clone(), openai(&mock.base_url)).with_prices(edge_prices());
    let scope = RunScope::new(run, acme.clone());
    let request = ModelRequest::new(EDGE_MODEL).user("hello");
    assert_eq!(request.max_tokens, None);
    let step = k
        .step_model(&scope, "m1", &request, ReplayPolicy::Strict)
        .await
        .unwrap();
    let body = mock.bodies.lock().unwrap()[0].clone();
    assert_eq!(
        body["max_tokens"].as_u64(),
        Some(u64::from(DEFAULT_RESERVE_MAX_TOKENS)),
        "the cap reserved for must be sent: {body}"
    );
    // The charge is within what was reserved.
    let evs = events(&t.db, run).await;
    let requested = evs.iter().find(|(t, _, _)| t == "model_requested").unwrap();
    let estimate = requested.2["estimate_usd"].as_f64().unwrap();
    assert!(step.cost_usd <= estimate, "{} > {estimate}", step.cost_usd);
    // Replay does not call again, and the fingerprint is the caller's request.
    let again = k
        .step_model(&scope, "m1", &request, ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(mock.bodies.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn prompt_estimate_bounds_the_tokens_of_any_script() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", &[], None).await;
    let run = new_run(&t.db, &acme).await;
    let mock = edge_mock(Usage::Edge).await;
    let k = Kernel::new(t.db.clone(), openai(&mock.base_url)).with_prices(edge_prices());
    let scope = RunScope::new(run, acme.clone());
    let mut rng = fastrand::Rng::with_seed(15);
    for i in 0..14 {
        let n = 1 + rng.usize(..2000);
        let (text, script) = script_text(&mut rng, n);
        let request = ModelRequest::new(EDGE_MODEL)
            .system("answer briefly")
            .user(text)
            .max_tokens(10);
        let step = k
            .step_model(&scope, &format!("s{i}"), &request, ReplayPolicy::Strict)
            .await
            .unwrap();
        let evs = events(&t.db, run).await;
        let requested = evs
            .iter()
            .rfind(|(t, k, _)| t == "model_requested" && k.as_deref() == Some(&format!("s{i}")))
            .unwrap();
        let estimate = requested.2["estimate_usd"].as_f64().unwrap();
        assert!(
            step.cost_usd <= estimate + 1e-12,
            "{script}: charged {} for a reservation of {estimate}",
            step.cost_usd
        );
    }
}

/// One concurrent model step of the property test.
async fn edge_step(
    k: Kernel,
    scope: RunScope,
    key: String,
    request: ModelRequest,
) -> pgcrew::Result<f64> {
    k.step_model(&scope, &key, &request, ReplayPolicy::Strict)
        .await
        .map(|s| s.cost_usd)
}

async fn spent_exact_le_limit(db: &Db, tenant: &TenantId) -> (bool, String) {
    let conn = db.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT spent_usd <= budget_usd_limit, spent_usd::text || ' / ' || budget_usd_limit::text
               FROM pgcrew.tenants WHERE id = $1",
            &[tenant],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_steps_at_the_edge_never_pass_the_budget() {
    let t = test_db().await;
    let mock = edge_mock(Usage::Edge).await;
    let k = Kernel::new(t.db.clone(), openai(&mock.base_url)).with_prices(edge_prices());
    let base_seed = std::env::var("PGCREW_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x15_b0d9e7u64);
    for round in 0..2u64 {
        let seed = base_seed + round;
        let mut rng = fastrand::Rng::with_seed(seed);
        let limit = 0.4 + rng.f64() * 0.4;
        let acme = tenant(&t.db, &format!("edge-{round}"), &[], Some(limit)).await;
        let mut runs_v = Vec::new();
        let mut run_limits = BTreeMap::new();
        for i in 0..8 {
            let run = new_run(&t.db, &acme).await;
            if i % 2 == 0 {
                let l = 0.05 + rng.f64() * 0.1;
                tenancy::set_run_budget(&t.db, &acme, run, Some(l))
                    .await
                    .unwrap();
                run_limits.insert(run, l);
            }
            runs_v.push(run);
        }
        let mut handles = Vec::new();
        let mut scripts = Vec::new();
        for i in 0..64 {
            let n = 1 + rng.usize(..3000);
            let (text, script) = script_text(&mut rng, n);
            scripts.push(script);
            let mut request = ModelRequest::new(EDGE_MODEL).user(text);
            if rng.bool() {
                request = request.max_tokens(1 + rng.u32(..3000));
            }
            let scope = RunScope::new(runs_v[i % runs_v.len()], acme.clone());
            handles.push(tokio::spawn(edge_step(
                k.clone(),
                scope,
                format!("step-{i}"),
                request,
            )));
        }
        let (mut ok, mut refused) = (0usize, 0usize);
        for (i, h) in handles.into_iter().enumerate() {
            match h.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) if e.is_budget_exceeded() => refused += 1,
                Err(e) => panic!("seed {seed}, step {i} ({}): {e}", scripts[i]),
            }
        }
        eprintln!("seed {seed}: limit {limit:.4}, {ok} steps settled, {refused} refused");
        assert_eq!(ok + refused, 64);
        assert!(
            ok > 0 && refused > 0,
            "seed {seed}: ok {ok}, refused {refused}"
        );
        let (within, figures) = spent_exact_le_limit(&t.db, &acme).await;
        assert!(
            within,
            "seed {seed}: tenant spent passed the limit: {figures}"
        );
        let tn = tenancy::get(&t.db, &acme).await.unwrap();
        assert!(tn.reserved_usd.abs() < 1e-12, "seed {seed}");
        for (run, l) in &run_limits {
            let conn = t.db.get().await.unwrap();
            let row = conn
                .query_one(
                    "SELECT budget_spent_usd <= budget_usd_limit, budget_spent_usd::float8
                       FROM pgcrew.runs WHERE id = $1",
                    &[run],
                )
                .await
                .unwrap();
            let (within, spent): (bool, f64) = (row.get(0), row.get(1));
            assert!(within, "seed {seed}: run {run} spent {spent} > {l}");
        }
        for run in &runs_v {
            let evs = events(&t.db, *run).await;
            assert_eq!(count(&evs, "budget_overrun"), 0, "seed {seed}");
        }
    }
    // Every request carried a cap.
    for b in mock.bodies.lock().unwrap().iter() {
        assert!(b["max_tokens"].as_u64().is_some(), "{b}");
    }
}

#[tokio::test]
async fn overrun_settlement_is_recorded_flagged_and_blocks_reservations() {
    let t = test_db().await;
    let mock = edge_mock(Usage::Overrun(50)).await;
    let k = Kernel::new(t.db.clone(), openai(&mock.base_url)).with_prices(edge_prices());

    // Tenant budget: one step reserves ~0.0015 but costs ~0.075 (the provider ignores the cap).
    let acme = tenant(&t.db, "acme", &[], Some(0.01)).await;
    let run = new_run(&t.db, &acme).await;
    let scope = RunScope::new(run, acme.clone());
    let request = ModelRequest::new(EDGE_MODEL).user("hi").max_tokens(100);
    let step = k
        .step_model(&scope, "m1", &request, ReplayPolicy::Strict)
        .await
        .expect("the paid call is recorded");
    assert!(step.cost_usd > 0.01);
    let tn = tenancy::get(&t.db, &acme).await.unwrap();
    assert_eq!(tn.spent_usd, step.cost_usd, "charged in full");
    assert_eq!(tn.status, BudgetStatus::Exceeded);
    let evs = events(&t.db, run).await;
    let overrun: Vec<_> = evs
        .iter()
        .filter(|(t, _, _)| t == "budget_overrun")
        .collect();
    assert_eq!(overrun.len(), 1, "{evs:?}");
    assert_eq!(overrun[0].1.as_deref(), Some("m1"));
    assert_eq!(overrun[0].2["scope"], "tenant");
    assert_eq!(overrun[0].2["limit_usd"], json!(0.01));
    // Nothing more can be reserved, even a free call.
    let err = tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), 0.0))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BudgetExceeded { .. }), "{err}");
    let err = k
        .step_model(&scope, "m2", &request, ReplayPolicy::Strict)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BudgetExceeded { .. }), "{err}");
    assert_eq!(mock.bodies.lock().unwrap().len(), 1);
    let evs = events(&t.db, run).await;
    let refused = evs
        .iter()
        .rfind(|(t, _, _)| t == "budget_exceeded")
        .unwrap();
    assert_eq!(refused.2["scope"], "tenant");
    // The books still balance: the overrun is a real, recorded cost.
    let conn = t.db.get().await.unwrap();
    let balanced: bool = conn
        .query_one(
            "SELECT (SELECT sum(cost_usd) FROM pgcrew.cost_entries WHERE tenant_id = 'acme') = spent_usd
               FROM pgcrew.tenants WHERE id = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(balanced);

    // A run budget: the overrun is flagged on the run's scope and the run refuses further
    // reservations while the tenant (with room left) still accepts them for other runs.
    let globex = tenant(&t.db, "globex", &[], Some(100.0)).await;
    let run2 = new_run(&t.db, &globex).await;
    tenancy::set_run_budget(&t.db, &globex, run2, Some(0.01))
        .await
        .unwrap();
    let scope2 = RunScope::new(run2, globex.clone());
    k.step_model(&scope2, "m1", &request, ReplayPolicy::Strict)
        .await
        .unwrap();
    let evs = events(&t.db, run2).await;
    let overrun: Vec<_> = evs
        .iter()
        .filter(|(t, _, _)| t == "budget_overrun")
        .collect();
    assert_eq!(overrun.len(), 1, "{evs:?}");
    assert_eq!(overrun[0].2["scope"], "run");
    let tn = tenancy::get(&t.db, &globex).await.unwrap();
    assert_ne!(tn.status, BudgetStatus::Exceeded);
    let err = k
        .step_model(&scope2, "m2", &request, ReplayPolicy::Strict)
        .await
        .unwrap_err();
    match &err {
        Error::RunBudgetExceeded { run, tenant, .. } => {
            assert_eq!(
                (run.as_str(), tenant.as_str()),
                (run2.to_string().as_str(), "globex")
            );
        }
        e => panic!("expected RunBudgetExceeded, got {e}"),
    }
    let evs = events(&t.db, run2).await;
    let refused = evs
        .iter()
        .rfind(|(t, _, _)| t == "budget_exceeded")
        .unwrap();
    assert_eq!(refused.2["scope"], "run");
    let other = new_run(&t.db, &globex).await;
    tenancy::reserve(&t.db, &ReserveRequest::new(globex.clone(), 0.5).run(other))
        .await
        .unwrap();
}

/// `settle_in_tx` / `charge_in_tx` report overruns to any caller (not only the kernel).
#[tokio::test]
async fn charges_past_the_limit_are_reported_by_the_settlement() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", &[], Some(1.0)).await;
    let run = new_run(&t.db, &acme).await;
    let r = tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), 0.5).run(run))
        .await
        .unwrap();
    let mut conn = t.db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let s = tenancy::settle_in_tx(&tx, &r, &tenancy::CostInput::llm("m", 1, 1, 0.4))
        .await
        .unwrap();
    assert!(s.overruns.is_empty());
    tx.commit().await.unwrap();
    let s = tenancy::charge(
        &t.db,
        &acme,
        Some(run),
        &tenancy::CostInput::other(tenancy::CostCategory::Tool, 0.7),
    )
    .await
    .unwrap();
    assert_eq!(
        s.overruns,
        vec![tenancy::BudgetOverrun {
            scope: tenancy::BudgetScope::Tenant,
            limit_usd: 1.0,
            spent_usd: 1.1,
        }]
    );
    assert_eq!(s.status, BudgetStatus::Exceeded);
    // A zero cost after the overrun is not another overrun.
    let s = tenancy::charge(
        &t.db,
        &acme,
        None,
        &tenancy::CostInput::other(tenancy::CostCategory::Other, 0.0),
    )
    .await
    .unwrap();
    assert!(s.overruns.is_empty());
    assert!(
        tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), 0.0))
            .await
            .unwrap_err()
            .is_budget_exceeded()
    );
}

// ------------------------------------------------------------------------------------------
// 2. NaN reaches money columns from SQL
// ------------------------------------------------------------------------------------------

const SETTLE_SQL: &str = include_str!("../../sql/queries/tenancy/settle.sql");
const RESERVE_TENANT_SQL: &str = include_str!("../../sql/queries/tenancy/reserve_tenant.sql");
const INSERT_RESERVATION_SQL: &str =
    include_str!("../../sql/queries/tenancy/insert_reservation.sql");

async fn money_text(db: &Db, tenant: &TenantId) -> (String, String) {
    let conn = db.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT spent_usd::text, reserved_usd::text FROM pgcrew.tenants WHERE id = $1",
            &[tenant],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn nan_and_infinite_money_is_refused_by_the_sql_queries() {
    let t = test_db().await;
    let limited = tenant(&t.db, "limited", &[], Some(10.0)).await;
    let unlimited = tenant(&t.db, "unlimited", &[], None).await;
    let conn = t.db.get().await.unwrap();
    for bad in [f64::NAN, f64::INFINITY, -1.0] {
        for who in [&limited, &unlimited] {
            let r = conn
                .query(
                    SETTLE_SQL,
                    &[
                        &None::<uuid::Uuid>,
                        who,
                        &None::<uuid::Uuid>,
                        &bad,
                        &"llm",
                        &"m",
                        &"s",
                        &0i64,
                        &0i64,
                    ],
                )
                .await;
            let e = r.expect_err(&format!("settle {bad} for {who} must be refused"));
            let text = Error::from(e).to_string();
            assert!(text.contains("cost_usd"), "{text}");
            let r = conn.query(RESERVE_TENANT_SQL, &[who, &bad]).await;
            assert!(r.is_err(), "reserve {bad} for {who}: {r:?}");
            let r = conn
                .query(
                    INSERT_RESERVATION_SQL,
                    &[
                        &uuid::Uuid::new_v4(),
                        who,
                        &None::<uuid::Uuid>,
                        &None::<String>,
                        &None::<String>,
                        &bad,
                    ],
                )
                .await;
            assert!(r.is_err(), "insert reservation {bad} for {who}: {r:?}");
        }
    }
    drop(conn);
    for who in [&limited, &unlimited] {
        assert_eq!(
            money_text(&t.db, who).await,
            ("0.0000000000".to_string(), "0.0000000000".to_string())
        );
        let tn = tenancy::get(&t.db, who).await.unwrap();
        assert_ne!(tn.status, BudgetStatus::Exceeded);
        tenancy::reserve(&t.db, &ReserveRequest::new(who.clone(), 1.0))
            .await
            .unwrap();
    }
    // Negative token counts too.
    let conn = t.db.get().await.unwrap();
    let r = conn
        .query(
            SETTLE_SQL,
            &[
                &None::<uuid::Uuid>,
                &limited,
                &None::<uuid::Uuid>,
                &0.5f64,
                &"llm",
                &"m",
                &"s",
                &-3i64,
                &0i64,
            ],
        )
        .await;
    assert!(r.is_err(), "negative prompt tokens: {r:?}");
}

#[tokio::test]
async fn the_database_refuses_bad_money_whoever_writes() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", &[], Some(10.0)).await;
    let run = new_run(&t.db, &acme).await;
    let conn = t.db.get().await.unwrap();
    let statements: Vec<(&str, String)> = vec![
        ("tenants.spent_usd", "UPDATE pgcrew.tenants SET spent_usd = 'NaN' WHERE id = 'acme'".into()),
        ("tenants.reserved_usd", "UPDATE pgcrew.tenants SET reserved_usd = 'NaN' WHERE id = 'acme'".into()),
        ("runs.cost_usd NaN", format!("UPDATE pgcrew.runs SET cost_usd = 'NaN' WHERE id = '{run}'")),
        ("runs.cost_usd negative", format!("UPDATE pgcrew.runs SET cost_usd = -1 WHERE id = '{run}'")),
        ("runs.input_tokens", format!("UPDATE pgcrew.runs SET input_tokens = -1 WHERE id = '{run}'")),
        ("runs.output_tokens", format!("UPDATE pgcrew.runs SET output_tokens = -1 WHERE id = '{run}'")),
        ("runs.budget_spent_usd", format!("UPDATE pgcrew.runs SET budget_spent_usd = 'NaN' WHERE id = '{run}'")),
        ("runs.budget_reserved_usd", format!("UPDATE pgcrew.runs SET budget_reserved_usd = 'NaN' WHERE id = '{run}'")),
        ("cost_entries.cost_usd", "INSERT INTO pgcrew.cost_entries (tenant_id, category, cost_usd) VALUES ('acme', 'llm', 'NaN')".into()),
        ("budget_reservations.amount_usd", "INSERT INTO pgcrew.budget_reservations (id, tenant_id, amount_usd) VALUES (gen_random_uuid(), 'acme', 'NaN')".into()),
    ];
    for (what, sql) in &statements {
        let r = conn.batch_execute(sql).await;
        assert!(r.is_err(), "{what} accepted a bad value");
    }
    let (spent, reserved) = money_text(&t.db, &acme).await;
    assert_eq!(
        (spent.as_str(), reserved.as_str()),
        ("0.0000000000", "0.0000000000")
    );
}

/// A database that already holds NaN (written before V012) is repaired by the migration.
#[tokio::test]
async fn migration_repairs_a_database_that_already_holds_nan() {
    mod embedded {
        refinery::embed_migrations!("sql");
    }
    let scratch = pgcrew::db::ScratchDatabase::for_tests().await.unwrap();
    let (mut client, conn) = tokio_postgres::connect(scratch.dsn(), NoTls).await.unwrap();
    let conn_task = tokio::spawn(conn);
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS pgcrew")
        .await
        .unwrap();
    let before_checks = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .filter(|v| *v < 12)
        .max()
        .unwrap();
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name("pgcrew.refinery_schema_history");
    runner
        .set_target(refinery::Target::Version(before_checks))
        .run_async(&mut client)
        .await
        .unwrap();
    // The state NaN settlements left behind (before V012 nothing refused them).
    client
        .batch_execute(
            "INSERT INTO pgcrew.tenants (id, budget_usd_limit) VALUES ('acme', 10), ('fine', 10);
             INSERT INTO pgcrew.runs (id, tenant_id, state, budget_usd_limit)
                  VALUES ('00000000-0000-4000-8000-000000000001', 'acme', 'running', 5);
             INSERT INTO pgcrew.cost_entries (tenant_id, run_id, category, model, prompt_tokens,
                                              completion_tokens, cost_usd)
                  VALUES ('acme', '00000000-0000-4000-8000-000000000001', 'llm', 'm', 10, 20, 0.5),
                         ('acme', '00000000-0000-4000-8000-000000000001', 'llm', 'm', 30, 40, 'NaN'),
                         ('fine', NULL, 'llm', 'm', 1, 1, 0.25);
             INSERT INTO pgcrew.budget_reservations (id, tenant_id, run_id, amount_usd)
                  VALUES ('00000000-0000-4000-8000-0000000000a1', 'acme',
                          '00000000-0000-4000-8000-000000000001', 0.25),
                         ('00000000-0000-4000-8000-0000000000a2', 'acme',
                          '00000000-0000-4000-8000-000000000001', 'NaN');
             UPDATE pgcrew.tenants SET spent_usd = 'NaN', reserved_usd = 'NaN' WHERE id = 'acme';
             UPDATE pgcrew.tenants SET spent_usd = 0.25 WHERE id = 'fine';
             UPDATE pgcrew.runs SET budget_spent_usd = 'NaN', budget_reserved_usd = 'NaN',
                                    cost_usd = 'NaN', input_tokens = -7, output_tokens = 3
              WHERE id = '00000000-0000-4000-8000-000000000001';",
        )
        .await
        .unwrap();
    let status: String = client
        .query_one(
            "SELECT budget_status FROM pgcrew.tenants WHERE id = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status, "EXCEEDED",
        "the NaN tenant is stuck before the repair"
    );
    drop(client);
    conn_task.abort();

    let db = Db::connect(scratch.dsn(), 4, Duration::from_secs(10))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    let conn = db.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT t.spent_usd::text, t.reserved_usd::text, t.budget_status,
                    r.budget_spent_usd::text, r.budget_reserved_usd::text, r.cost_usd::text,
                    r.input_tokens, r.output_tokens,
                    (SELECT count(*) FROM pgcrew.budget_reservations WHERE tenant_id = 'acme'),
                    (SELECT string_agg(cost_usd::text, ',' ORDER BY id) FROM pgcrew.cost_entries
                      WHERE tenant_id = 'acme'),
                    (SELECT spent_usd::text FROM pgcrew.tenants WHERE id = 'fine')
               FROM pgcrew.tenants t, pgcrew.runs r
              WHERE t.id = 'acme' AND r.id = '00000000-0000-4000-8000-000000000001'",
            &[],
        )
        .await
        .unwrap();
    let got: (
        String,
        String,
        String,
        String,
        String,
        String,
        i64,
        i64,
        i64,
        String,
        String,
    ) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
        row.get(6),
        row.get(7),
        row.get(8),
        row.get(9),
        row.get(10),
    );
    assert_eq!(
        got,
        (
            // spent = the valid cost entries (the NaN entry is zeroed).
            "0.5000000000".into(),
            // reserved = the valid open reservation (the NaN one is released).
            "0.2500000000".into(),
            "HEALTHY".into(),
            "0.5000000000".into(),
            "0.2500000000".into(),
            "0.5000000000".into(),
            // Tokens recomputed from the run's cost entries.
            40,
            3,
            1,
            "0.5000000000,0.0000000000".into(),
            // A tenant with valid figures is left alone.
            "0.2500000000".into(),
        )
    );
    // Every repair is logged for the operator.
    let repairs = scalar_on(&conn, "SELECT count(*) FROM pgcrew.money_repairs").await;
    assert!(repairs >= 8, "{repairs} repairs logged");
    // The tenant works again.
    tenancy::reserve(
        &db,
        &ReserveRequest::new(TenantId::new("acme").unwrap(), 1.0),
    )
    .await
    .unwrap();
}

// ------------------------------------------------------------------------------------------
// 3. A panic on non-ASCII model names
// ------------------------------------------------------------------------------------------

#[test]
fn non_ascii_model_names_never_panic_in_price_lookup() {
    let mut table = PriceTable::builtin();
    table.set("modèle", 1.0, 2.0).unwrap();
    table.set("模型", 1.0, 2.0).unwrap();
    for name in [
        "modèle-2024-08",
        "modèle-2024-08-06",
        "模型-2024-08-06",
        "模型-2024-0８-06",
        "gpt-4o-mini-２０２４-０７-１８",
        "🤖🤖🤖🤖🤖🤖🤖🤖",
        "é-2024-08-0",
        "ü1234567890",
        "modèle",
    ] {
        let r = std::panic::catch_unwind(|| table.get(name));
        assert!(r.is_ok(), "PriceTable::get({name:?}) panicked");
    }
    assert_eq!(
        table.get("modèle-2024-08-06").unwrap().prompt_per_million,
        1.0
    );
    assert_eq!(
        table.get("模型-2024-08-06").unwrap().prompt_per_million,
        1.0
    );
    assert!(matches!(
        table.get("modèle-2024-08"),
        Err(Error::UnknownModelPrice(_))
    ));
    // Random Unicode strings (including dated-looking tails) never panic.
    let mut rng = fastrand::Rng::with_seed(3);
    for _ in 0..20_000 {
        let len = rng.usize(0..24);
        let mut s: String = (0..len)
            .map(|_| match rng.u8(..4) {
                0 => rng.char('0'..='9'),
                1 => '-',
                2 => rng.char('a'..='z'),
                _ => rng.char(..),
            })
            .collect();
        if rng.bool() {
            s.push_str("-2024-08-06");
        }
        let r = std::panic::catch_unwind(|| table.get(&s));
        assert!(r.is_ok(), "PriceTable::get({s:?}) panicked");
    }
}

#[tokio::test]
async fn agent_with_a_non_ascii_model_name_fails_cleanly() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", &[], Some(1.0)).await;
    let model = Arc::new(ScriptedModel::by_turn(vec![ScriptedReply::text("bonjour")]));
    let rt = AgentRuntime::new(Kernel::new(t.db.clone(), model.clone()), "i1");
    let session = rt.new_session(&acme, "s").await.unwrap();
    for (i, name) in ["modèle-2024-08", "模型-2024-08-06", "🤖-2024-08-0"]
        .iter()
        .enumerate()
    {
        let agent = format!("a{i}");
        register_agent(&t.db, &AgentDef::new(agent.clone(), *name))
            .await
            .unwrap();
        let run = rt.submit(&agent, session.id, "bonjour").await.unwrap();
        let handle = tokio::spawn({
            let rt = rt.clone();
            async move { rt.execute(run, None).await }
        });
        let r = handle
            .await
            .unwrap_or_else(|e| panic!("{name}: the agent run panicked: {e}"))
            .unwrap();
        assert_eq!(r.state, RunState::Failed, "{name}");
        assert_eq!(
            r.error_type.as_deref(),
            Some("unknown_model_price"),
            "{name}"
        );
    }
    assert_eq!(model.calls(), 0);
}

// ------------------------------------------------------------------------------------------
// 4. Capability denial inside an agent run
// ------------------------------------------------------------------------------------------

fn charge_tool(body_runs: Arc<AtomicU64>) -> Tool {
    Tool::builder("charge_card")
        .description("charges a card")
        .input_schema(json!({
            "type": "object",
            "properties": {"amount_cents": {"type": "integer"}},
            "required": ["amount_cents"]
        }))
        .requires_capability("payments:charge")
        .handler(move |_ctx, args| {
            let body_runs = body_runs.clone();
            async move {
                body_runs.fetch_add(1, Ordering::SeqCst);
                Ok(json!({"charged": args["amount_cents"]}))
            }
        })
        .build()
        .unwrap()
}

fn payer_script() -> Vec<ScriptedReply> {
    vec![
        ScriptedReply::tool_call("charge_card", json!({"amount_cents": 500})),
        ScriptedReply::text("I could not charge the card."),
    ]
}

#[tokio::test]
async fn capability_denial_returned_to_the_model_when_the_agent_says_so() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", &[], Some(1.0)).await;
    let body_runs = Arc::new(AtomicU64::new(0));
    let tools = ToolRegistry::new()
        .with(charge_tool(body_runs.clone()))
        .unwrap();
    let def = AgentDef::new("lenient", "gpt-4o-mini")
        .tool("charge_card")
        .max_tokens(100)
        .on_capability_denied(CapabilityDenialPolicy::ReturnToModel);
    register_agent(&t.db, &def).await.unwrap();
    assert_eq!(
        pgcrew::agent::get_agent(&t.db, "lenient")
            .await
            .unwrap()
            .on_capability_denied,
        CapabilityDenialPolicy::ReturnToModel
    );
    let model = Arc::new(ScriptedModel::by_turn(payer_script()));
    let rt = agent_runtime(&t.db, model.clone(), tools, "i1");
    let run = submit_run(&rt, &acme, "s", "lenient", "charge 5 USD").await;
    let r = rt.execute(run, None).await.unwrap();
    assert_eq!(r.state, RunState::Completed);
    assert_eq!(
        r.response_text.as_deref(),
        Some("I could not charge the card.")
    );
    assert_eq!(body_runs.load(Ordering::SeqCst), 0, "the tool did not run");
    // The model saw the denial as the tool's result.
    let last = model.requests().pop().unwrap();
    let tool_text = last
        .messages
        .iter()
        .find(|m| m.role() == "tool")
        .map(|m| m.text().to_string())
        .unwrap();
    assert!(tool_text.contains("capability denied"), "{tool_text}");
    assert!(tool_text.contains("payments:charge"), "{tool_text}");
    let evs = events(&t.db, run).await;
    assert_eq!(count(&evs, "capability_denied"), 1);
    let denied = evs
        .iter()
        .find(|(t, _, _)| t == "capability_denied")
        .unwrap();
    assert_eq!(denied.2["capability"], "payments:charge");
    assert_eq!(count(&evs, "run_completed"), 1);
}

#[tokio::test]
async fn capability_denial_fails_the_agent_run_by_default() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", &[], Some(1.0)).await;
    let body_runs = Arc::new(AtomicU64::new(0));
    let tools = ToolRegistry::new()
        .with(charge_tool(body_runs.clone()))
        .unwrap();
    let def = AgentDef::new("payer", "gpt-4o-mini")
        .tool("charge_card")
        .max_tokens(100);
    assert_eq!(def.on_capability_denied, CapabilityDenialPolicy::FailRun);
    register_agent(&t.db, &def).await.unwrap();
    let model = Arc::new(ScriptedModel::by_turn(payer_script()));
    let rt = agent_runtime(&t.db, model.clone(), tools, "i1");
    let run = submit_run(&rt, &acme, "s", "payer", "charge 5 USD").await;
    let r = rt.execute(run, None).await.unwrap();
    assert_eq!(r.state, RunState::Failed);
    assert_eq!(r.error_type.as_deref(), Some("capability_denied"));
    assert!(
        r.error_message
            .as_deref()
            .unwrap_or_default()
            .contains("payments:charge"),
        "{:?}",
        r.error_message
    );
    assert_eq!(body_runs.load(Ordering::SeqCst), 0, "the tool did not run");
    assert_eq!(model.calls(), 1, "the model was not asked again");
    let evs = events(&t.db, run).await;
    assert_eq!(count(&evs, "capability_denied"), 1);
    assert_eq!(count(&evs, "run_failed"), 1);
}
