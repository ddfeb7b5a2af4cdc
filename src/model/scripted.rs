//! A scripted, offline [`ModelPort`] for demos and tests: deterministic, no network.
//!
//! Four behaviours:
//! - [`ScriptedModel::sequence`]: the n-th call gets the n-th scripted reply;
//! - [`ScriptedModel::by_turn`]: the reply is chosen by the conversation turn (the number of
//!   assistant messages already in the request), so it is a pure function of the request —
//!   the same on every instance and after a crash;
//! - [`ScriptedModel::from_fn`]: any closure `Fn(&ModelRequest) -> Result<ModelResponse>`;
//! - [`ScriptedModel::demo_agent`]: calls each of the request's tools once (arguments built
//!   from the prompt and the tool's JSON schema), then answers with a text (or, when an output
//!   schema is requested, JSON) summarising the tool results.
//!
//! Usage is realistic: ~4 characters per token for the prompt (messages, tools, schema) and the
//! completion, and the completion respects `max_tokens` (a longer text answer is truncated and
//! finishes with [`FinishReason::Length`]). Every call is counted, and the latest
//! [`RECORDED_REQUESTS`] requests are kept ([`ScriptedModel::requests`]).
//!
//! ```
//! use pgcrew::model::{ModelPort, ModelRequest, ScriptedModel, ScriptedReply};
//!
//! # async fn demo() -> pgcrew::Result<()> {
//! let model = ScriptedModel::sequence(vec![ScriptedReply::text("hello")]);
//! let r = model.complete(&ModelRequest::new("gpt-4o-mini").user("hi")).await?;
//! assert_eq!(r.content_text(), "hello");
//! assert_eq!(model.calls(), 1);
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use crate::error::Result;
use crate::model::port::{
    FinishReason, Message, ModelErrorKind, ModelPort, ModelRequest, ModelResponse, ToolCall, Usage,
    estimate_prompt_tokens, estimate_tokens, model_error,
};

/// One scripted answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ScriptedReply {
    /// A text answer.
    Text(String),
    /// Tool calls: `(tool name, arguments)`; ids are generated deterministically
    /// (`call_<turn>_<index>`).
    ToolCalls(Vec<(String, Value)>),
    /// A JSON answer (structured output), sent as its text.
    Json(Value),
    /// A provider error ([`crate::Error::Model`] with this kind and message).
    Error {
        /// The error kind.
        kind: ModelErrorKind,
        /// The message.
        message: String,
    },
}

impl ScriptedReply {
    /// A text answer.
    pub fn text(text: impl Into<String>) -> Self {
        ScriptedReply::Text(text.into())
    }

    /// One tool call.
    pub fn tool_call(name: impl Into<String>, arguments: Value) -> Self {
        ScriptedReply::ToolCalls(vec![(name.into(), arguments)])
    }

    /// A JSON answer.
    pub fn json(value: Value) -> Self {
        ScriptedReply::Json(value)
    }

    /// A provider error.
    pub fn error(kind: ModelErrorKind, message: impl Into<String>) -> Self {
        ScriptedReply::Error {
            kind,
            message: message.into(),
        }
    }
}

type ReplyFn = dyn Fn(&ModelRequest) -> Result<ModelResponse> + Send + Sync;

enum Mode {
    Sequence(Vec<ScriptedReply>),
    ByTurn(Vec<ScriptedReply>),
    Func(Box<ReplyFn>),
    DemoAgent,
}

/// The offline scripted model (see the [module docs](self)).
pub struct ScriptedModel {
    name: String,
    mode: Mode,
    delay: Duration,
    calls: AtomicU64,
    /// Valid requests answered in sequence mode (an invalid request does not use up a reply).
    served: AtomicU64,
    /// The latest [`RECORDED_REQUESTS`] requests, oldest first.
    requests: Mutex<VecDeque<ModelRequest>>,
}

/// How many of the latest requests a [`ScriptedModel`] keeps for [`ScriptedModel::requests`].
/// Bounded: `pgcrew serve` without a model key hosts the demo agent on this model for as long
/// as it runs, and keeping every request grew its memory by every model call (issue #22's soak:
/// about 0.5 MiB a minute per instance at 2 runs/s).
pub const RECORDED_REQUESTS: usize = 256;

impl fmt::Debug for ScriptedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match &self.mode {
            Mode::Sequence(r) => format!("sequence({} replies)", r.len()),
            Mode::ByTurn(r) => format!("by_turn({} replies)", r.len()),
            Mode::Func(_) => "from_fn".to_string(),
            Mode::DemoAgent => "demo_agent".to_string(),
        };
        f.debug_struct("ScriptedModel")
            .field("name", &self.name)
            .field("mode", &mode)
            .field("calls", &self.calls())
            .finish()
    }
}

/// The number of assistant messages in the request: the conversation turn.
fn turn_of(request: &ModelRequest) -> usize {
    request
        .messages
        .iter()
        .filter(|m| matches!(m, Message::Assistant { .. }))
        .count()
}

impl ScriptedModel {
    fn with_mode(mode: Mode) -> Self {
        Self {
            name: "scripted".to_string(),
            mode,
            delay: Duration::ZERO,
            calls: AtomicU64::new(0),
            served: AtomicU64::new(0),
            requests: Mutex::new(VecDeque::new()),
        }
    }

    /// The n-th valid call (counted from 0 on this instance) gets `replies[n]`; a call past
    /// the end fails with kind `script_exhausted`.
    pub fn sequence(replies: Vec<ScriptedReply>) -> Self {
        Self::with_mode(Mode::Sequence(replies))
    }

    /// The reply is `replies[turn]`, where `turn` is the number of assistant messages already
    /// in the request. A pure function of the request: deterministic across instances and
    /// crashes. A turn past the end fails with kind `script_exhausted`.
    pub fn by_turn(replies: Vec<ScriptedReply>) -> Self {
        Self::with_mode(Mode::ByTurn(replies))
    }

    /// Answer with a closure. [`ScriptedModel::reply`] builds a response with realistic usage.
    pub fn from_fn(
        f: impl Fn(&ModelRequest) -> Result<ModelResponse> + Send + Sync + 'static,
    ) -> Self {
        Self::with_mode(Mode::Func(Box::new(f)))
    }

    /// The demo agent: when the request offers tools and none has answered since the last user
    /// message, call every tool once (arguments built from the prompt and each tool's JSON
    /// schema); otherwise answer with a summary of the tool results (JSON shaped by the output
    /// schema when one is requested). Deterministic: a pure function of the request.
    pub fn demo_agent() -> Self {
        Self::with_mode(Mode::DemoAgent)
    }

    /// Set the name reported by [`ModelPort::name`] (default `scripted`).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Wait `delay` before every answer (to simulate provider latency).
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// How many times [`complete`](ModelPort::complete) was called (including failed calls).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// The requests received, in order: all of them, or the latest [`RECORDED_REQUESTS`].
    pub fn requests(&self) -> Vec<ModelRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Build the response to `request` for `reply`, with realistic usage (~4 characters per
    /// token) and `max_tokens` respected.
    pub fn reply(request: &ModelRequest, reply: &ScriptedReply) -> Result<ModelResponse> {
        let turn = turn_of(request);
        match reply {
            ScriptedReply::Text(t) => Ok(text_response(request, t)),
            ScriptedReply::Json(v) => Ok(text_response(request, &v.to_string())),
            ScriptedReply::ToolCalls(calls) => {
                let calls = calls
                    .iter()
                    .enumerate()
                    .map(|(i, (name, args))| {
                        ToolCall::new(format!("call_{turn}_{i}"), name.clone(), args.clone())
                    })
                    .collect();
                Ok(tool_response(request, calls))
            }
            ScriptedReply::Error { kind, message } => Err(model_error(*kind, message.clone())),
        }
    }
}

fn prompt_usage(request: &ModelRequest, completion_chars: usize) -> (Usage, bool) {
    let completion = estimate_tokens(completion_chars).max(1);
    let (completion, capped) = match request.max_tokens {
        Some(max) if completion > u64::from(max) => (u64::from(max), true),
        _ => (completion, false),
    };
    (
        Usage {
            prompt_tokens: estimate_prompt_tokens(request),
            completion_tokens: completion,
            estimated: false,
        },
        capped,
    )
}

fn text_response(request: &ModelRequest, text: &str) -> ModelResponse {
    let (usage, capped) = prompt_usage(request, text.chars().count());
    let (content, finish_reason) = if capped {
        let keep = usize::try_from(usage.completion_tokens.saturating_mul(4)).unwrap_or(usize::MAX);
        (text.chars().take(keep).collect(), FinishReason::Length)
    } else {
        (text.to_string(), FinishReason::Stop)
    };
    ModelResponse {
        content: Some(content),
        tool_calls: Vec::new(),
        usage,
        finish_reason,
        model: request.model.clone(),
    }
}

fn tool_response(request: &ModelRequest, calls: Vec<ToolCall>) -> ModelResponse {
    let chars: usize = calls
        .iter()
        .map(|c| c.name.len() + c.arguments.to_string().chars().count())
        .sum();
    let (usage, _) = prompt_usage(request, chars);
    ModelResponse {
        content: None,
        tool_calls: calls,
        usage,
        finish_reason: FinishReason::ToolCalls,
        model: request.model.clone(),
    }
}

/// The first number in `text`, if any.
fn first_number(text: &str) -> Option<f64> {
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (start, c.is_ascii_digit()) {
            (None, true) => start = Some(i),
            (Some(s), false) if c != '.' => return text[s..i].trim_end_matches('.').parse().ok(),
            _ => {}
        }
    }
    start.and_then(|s| text[s..].trim_end_matches('.').parse().ok())
}

/// A value for `schema` built from `text` (strings), `number` (numbers) and `items` (arrays of
/// strings).
fn value_for(schema: &Value, text: &str, number: f64, items: &[String], depth: usize) -> Value {
    if depth > 8 {
        return Value::Null;
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    let ty = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("string"),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match ty {
        "integer" => json!(number.round() as i64),
        "number" => json!(number),
        "boolean" => json!(true),
        "null" => Value::Null,
        "array" => {
            let item_schema = schema.get("items").cloned().unwrap_or(json!({}));
            if items.is_empty() {
                json!([value_for(&item_schema, text, number, items, depth + 1)])
            } else {
                Value::Array(
                    items
                        .iter()
                        .map(|i| value_for(&item_schema, i, number, &[], depth + 1))
                        .collect(),
                )
            }
        }
        "object" => {
            let mut out = Map::new();
            match schema.get("properties").and_then(Value::as_object) {
                Some(props) if !props.is_empty() => {
                    for (k, p) in props {
                        out.insert(k.clone(), value_for(p, text, number, items, depth + 1));
                    }
                }
                _ if depth == 0 => {
                    out.insert("input".into(), json!(text));
                }
                _ => {}
            }
            Value::Object(out)
        }
        _ => json!(text),
    }
}

fn demo_agent_reply(request: &ModelRequest) -> ModelResponse {
    let prompt = request.last_user_text().unwrap_or("").to_string();
    let last_user = request
        .messages
        .iter()
        .rposition(|m| matches!(m, Message::User { .. }))
        .unwrap_or(0);
    let since_prompt = &request.messages[last_user..];
    let tool_results: Vec<(String, String)> = {
        // Map tool_call_id -> tool name through the assistant turns since the prompt.
        let mut names = std::collections::BTreeMap::new();
        for m in since_prompt {
            if let Message::Assistant { tool_calls, .. } = m {
                for c in tool_calls {
                    names.insert(c.id.clone(), c.name.clone());
                }
            }
        }
        since_prompt
            .iter()
            .filter_map(|m| match m {
                Message::Tool {
                    tool_call_id,
                    content,
                } => Some((
                    names
                        .get(tool_call_id)
                        .cloned()
                        .unwrap_or_else(|| tool_call_id.clone()),
                    content.clone(),
                )),
                _ => None,
            })
            .collect()
    };
    let called_tools = since_prompt
        .iter()
        .any(|m| matches!(m, Message::Assistant { tool_calls, .. } if !tool_calls.is_empty()));
    if !request.tools.is_empty() && !called_tools {
        let turn = turn_of(request);
        let number = first_number(&prompt).unwrap_or(1.0);
        let calls = request
            .tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                ToolCall::new(
                    format!("call_{turn}_{i}"),
                    t.name.clone(),
                    value_for(&t.parameters, &prompt, number, &[], 0),
                )
            })
            .collect();
        return tool_response(request, calls);
    }
    let summary = if tool_results.is_empty() {
        format!("You asked: \"{prompt}\". This is the scripted demo model's answer.")
    } else {
        let parts: Vec<String> = tool_results
            .iter()
            .map(|(name, content)| format!("{name} returned {content}"))
            .collect();
        format!("For \"{prompt}\": {}.", parts.join("; "))
    };
    if let Some(schema) = &request.output_schema {
        let items: Vec<String> = tool_results.iter().map(|(_, c)| c.clone()).collect();
        let value = value_for(
            &schema.schema,
            &summary,
            tool_results.len() as f64,
            &items,
            1,
        );
        return text_response(request, &value.to_string());
    }
    text_response(request, &summary)
}

#[async_trait]
impl ModelPort for ScriptedModel {
    fn name(&self) -> &str {
        &self.name
    }

    async fn complete(&self, request: &ModelRequest) -> Result<ModelResponse> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        {
            let mut recorded = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            if recorded.len() >= RECORDED_REQUESTS {
                recorded.pop_front();
            }
            recorded.push_back(request.clone());
        }
        request.validate()?;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let exhausted = |i: usize, len: usize| {
            model_error(
                ModelErrorKind::ScriptExhausted,
                format!("the scripted model has {len} replies and reply {i} was asked for"),
            )
        };
        match &self.mode {
            Mode::Sequence(replies) => {
                let n = self.served.fetch_add(1, Ordering::SeqCst);
                let i = usize::try_from(n).unwrap_or(usize::MAX);
                let reply = replies.get(i).ok_or_else(|| exhausted(i, replies.len()))?;
                Self::reply(request, reply)
            }
            Mode::ByTurn(replies) => {
                let i = turn_of(request);
                let reply = replies.get(i).ok_or_else(|| exhausted(i, replies.len()))?;
                Self::reply(request, reply)
            }
            Mode::Func(f) => f(request),
            Mode::DemoAgent => Ok(demo_agent_reply(request)),
        }
    }
}
