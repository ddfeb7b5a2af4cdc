//! Issue #15, budget and money edges: the completion cap sent is the one reserved for, the prompt
//! estimate is an upper bound for any script, overruns are recorded and flagged, the database
//! refuses NaN / infinite / negative money, non-ASCII model names do not panic, and capability
//! denials inside agent runs follow the agent's policy.

mod denial;
mod money;
mod names;
mod spend;

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

use crate::common::{
    TestDb, agent_runtime, count, db_with_tenant, ledger_events, scalar_on, submit_run, tenant,
    test_db,
};
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

// ------------------------------------------------------------------------------------------
// 2. NaN reaches money columns from SQL
// ------------------------------------------------------------------------------------------

// ------------------------------------------------------------------------------------------
// 3. A panic on non-ASCII model names
// ------------------------------------------------------------------------------------------

// ------------------------------------------------------------------------------------------
// 4. Capability denial inside an agent run
// ------------------------------------------------------------------------------------------

/// The events of type `ty` among `evs`.
fn of_type<'a>(
    evs: &'a [(String, Option<String>, Value)],
    ty: &str,
) -> Vec<&'a (String, Option<String>, Value)> {
    evs.iter().filter(|(t, _, _)| t == ty).collect()
}
