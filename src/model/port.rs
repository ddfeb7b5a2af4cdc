//! The provider-neutral model port: chat messages, tool specs, requests, responses, usage, and the
//! [`ModelPort`] trait every adapter implements.
//!
//! All types are serde-serialisable: the kernel stores requests and responses in the ledger.
//! [`ModelRequest::fingerprint`] identifies a request for replay (same fingerprint = logically the
//! same call).

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::PriceTable;

/// The `kind` strings of [`Error::Model`], as produced by the adapters in this module.
pub mod error_kind {
    /// The provider rate-limited the call (HTTP 429); retried with backoff.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The account has no quota left (HTTP 429 `insufficient_quota`); not retried.
    pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
    /// The provider failed (HTTP 5xx); retried with backoff.
    pub const SERVER: &str = "server";
    /// The call did not finish within the per-request timeout; retried with backoff.
    pub const TIMEOUT: &str = "timeout";
    /// The provider could not be reached or the connection broke; retried with backoff.
    pub const CONNECTION: &str = "connection";
    /// The provider rejected the credentials (HTTP 401/403).
    pub const AUTH: &str = "auth";
    /// The provider (or pgcrew, before sending) rejected the request as malformed.
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// The provider answered with something that is not a chat completion.
    pub const INVALID_RESPONSE: &str = "invalid_response";
    /// The model's output is unusable: invalid JSON, JSON not matching the expected type, or
    /// tool-call arguments that are not JSON.
    pub const INVALID_OUTPUT: &str = "invalid_output";
    /// A scripted model ran out of scripted replies.
    pub const SCRIPT_EXHAUSTED: &str = "script_exhausted";

    /// True for the kinds that are transient and worth retrying.
    pub fn is_retryable(kind: &str) -> bool {
        matches!(kind, RATE_LIMITED | SERVER | TIMEOUT | CONNECTION)
    }
}

/// Shorthand for an [`Error::Model`].
pub fn model_error(kind: &str, message: impl Into<String>) -> Error {
    Error::Model {
        kind: kind.to_string(),
        message: message.into(),
    }
}

/// A tool call requested by the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id of this call; the tool result must carry it back as `tool_call_id`.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The parsed JSON arguments.
    pub arguments: Value,
}

impl ToolCall {
    /// A tool call.
    pub fn new(id: impl Into<String>, name: impl Into<String>, arguments: Value) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            arguments,
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Message {
    /// Instructions for the model.
    System {
        /// The text.
        content: String,
    },
    /// The user's turn.
    User {
        /// The text.
        content: String,
    },
    /// A previous model turn: text and/or tool calls.
    Assistant {
        /// The text, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<String>,
        /// Tool calls the model made in this turn.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ToolCall>,
    },
    /// The result of a tool call.
    Tool {
        /// The id of the [`ToolCall`] this answers.
        tool_call_id: String,
        /// The result (usually JSON text).
        content: String,
    },
}

impl Message {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Message::System {
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Message::User {
            content: content.into(),
        }
    }

    /// An assistant text message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Message::Assistant {
            content: Some(content.into()),
            tool_calls: Vec::new(),
        }
    }

    /// An assistant turn that made tool calls.
    pub fn assistant_tool_calls(tool_calls: Vec<ToolCall>) -> Self {
        Message::Assistant {
            content: None,
            tool_calls,
        }
    }

    /// A tool result answering the call `tool_call_id`.
    pub fn tool_result(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Message::Tool {
            tool_call_id: tool_call_id.into(),
            content: content.into(),
        }
    }

    /// The assistant message that records `response` in a conversation (to send it back with
    /// the tool results on the next turn).
    pub fn from_response(response: &ModelResponse) -> Self {
        Message::Assistant {
            content: response.content.clone(),
            tool_calls: response.tool_calls.clone(),
        }
    }

    /// The role name (`system`, `user`, `assistant`, `tool`).
    pub fn role(&self) -> &'static str {
        match self {
            Message::System { .. } => "system",
            Message::User { .. } => "user",
            Message::Assistant { .. } => "assistant",
            Message::Tool { .. } => "tool",
        }
    }

    /// The message text (empty for an assistant turn with only tool calls).
    pub fn text(&self) -> &str {
        match self {
            Message::System { content } | Message::User { content } => content,
            Message::Tool { content, .. } => content,
            Message::Assistant { content, .. } => content.as_deref().unwrap_or(""),
        }
    }
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// The tool's name (`^[a-zA-Z0-9_-]{1,64}$`, as OpenAI-compatible APIs require).
    pub name: String,
    /// What the tool does (the model reads it).
    pub description: String,
    /// JSON schema of the arguments (an object schema).
    pub parameters: Value,
}

impl ToolSpec {
    /// A tool spec.
    pub fn new(name: impl Into<String>, description: impl Into<String>, parameters: Value) -> Self {
        Self {
            name: name.into(),
            description: description.into(),
            parameters,
        }
    }
}

/// A structured-output request: the model must answer with JSON matching `schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSchema {
    /// The schema's name (`^[a-zA-Z0-9_-]{1,64}$`).
    pub name: String,
    /// The JSON schema (an object schema).
    pub schema: Value,
    /// Ask the provider for strict schema adherence (OpenAI's `strict: true`, which requires
    /// every property to be `required` and `additionalProperties: false`). Default: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict: bool,
}

/// A provider-neutral chat completion request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRequest {
    /// The model name (`gpt-4o-mini`, `llama3.1`, ...).
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
    /// Maximum completion tokens (`None` = provider default). The kernel reserves budget for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Structured output: the answer must be JSON matching this schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<OutputSchema>,
    /// Free-form extra options passed through to the provider (`top_p`, `seed`, `stop`, or a
    /// server-specific option such as vLLM's `top_k`). They may not override the fields above.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

/// Options an adapter sets itself; `extra` may not contain them.
const RESERVED_OPTIONS: &[&str] = &[
    "model",
    "messages",
    "tools",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "response_format",
    "stream",
];

fn validate_name(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 {
        return Err(Error::invalid(
            field,
            format!("`{name}` must be 1 to 64 characters long"),
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::invalid(
            field,
            format!("`{name}` may only contain ASCII letters, digits, `_` and `-`"),
        ));
    }
    Ok(())
}

fn validate_object_schema(field: &'static str, owner: &str, schema: &Value) -> Result<()> {
    let Some(obj) = schema.as_object() else {
        return Err(Error::invalid(
            field,
            format!("the JSON schema of `{owner}` must be a JSON object, got {schema}"),
        ));
    };
    if let Some(t) = obj.get("type")
        && t != "object"
    {
        return Err(Error::invalid(
            field,
            format!(
                "the JSON schema of `{owner}` must describe an object (\"type\": \"object\"), got type {t}"
            ),
        ));
    }
    Ok(())
}

impl ModelRequest {
    /// A request for `model` with no messages yet.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            messages: Vec::new(),
            tools: Vec::new(),
            max_tokens: None,
            temperature: None,
            output_schema: None,
            extra: Map::new(),
        }
    }

    /// Append a message.
    pub fn message(mut self, message: Message) -> Self {
        self.messages.push(message);
        self
    }

    /// Append a system message.
    pub fn system(self, content: impl Into<String>) -> Self {
        self.message(Message::system(content))
    }

    /// Append a user message.
    pub fn user(self, content: impl Into<String>) -> Self {
        self.message(Message::user(content))
    }

    /// Offer a tool.
    pub fn tool(mut self, tool: ToolSpec) -> Self {
        self.tools.push(tool);
        self
    }

    /// Set the maximum completion tokens.
    pub fn max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// Set the temperature.
    pub fn temperature(mut self, temperature: f64) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Ask for structured output matching `schema`.
    pub fn output_schema(mut self, name: impl Into<String>, schema: Value) -> Self {
        self.output_schema = Some(OutputSchema {
            name: name.into(),
            schema,
            strict: false,
        });
        self
    }

    /// Ask for structured output matching `schema`, with strict adherence (see
    /// [`OutputSchema::strict`]).
    pub fn output_schema_strict(mut self, name: impl Into<String>, schema: Value) -> Self {
        self.output_schema = Some(OutputSchema {
            name: name.into(),
            schema,
            strict: true,
        });
        self
    }

    /// Set a free-form extra option.
    pub fn extra(mut self, key: impl Into<String>, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }

    /// Check the request before sending it: a model name, at least one message, tool ids that
    /// answer earlier calls, valid tool and schema names, object schemas, a temperature in
    /// [0, 2], a positive `max_tokens`, unique tool names, no reserved key in `extra`.
    pub fn validate(&self) -> Result<()> {
        crate::ids::validate_text_id("model", &self.model)?;
        if self.messages.is_empty() {
            return Err(Error::invalid(
                "messages",
                "a model request needs at least one message (add one with .user(..))",
            ));
        }
        let mut call_ids = std::collections::BTreeSet::new();
        for (i, m) in self.messages.iter().enumerate() {
            match m {
                Message::Assistant {
                    content,
                    tool_calls,
                } => {
                    if content.is_none() && tool_calls.is_empty() {
                        return Err(Error::invalid(
                            "messages",
                            format!("message {i} (assistant) has neither content nor tool calls"),
                        ));
                    }
                    for c in tool_calls {
                        call_ids.insert(c.id.as_str());
                    }
                }
                Message::Tool { tool_call_id, .. } => {
                    if !call_ids.contains(tool_call_id.as_str()) {
                        return Err(Error::invalid(
                            "messages",
                            format!(
                                "message {i} is a tool result for call `{tool_call_id}`, but no earlier assistant message made that call"
                            ),
                        ));
                    }
                }
                Message::System { .. } | Message::User { .. } => {}
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for t in &self.tools {
            validate_name("tool name", &t.name)?;
            if !names.insert(t.name.as_str()) {
                return Err(Error::invalid(
                    "tools",
                    format!("tool `{}` is listed twice", t.name),
                ));
            }
            validate_object_schema("tool parameters", &t.name, &t.parameters)?;
        }
        if let Some(s) = &self.output_schema {
            validate_name("output schema name", &s.name)?;
            validate_object_schema("output schema", &s.name, &s.schema)?;
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            return Err(Error::invalid(
                "temperature",
                format!("{t} is outside the accepted range 0 to 2"),
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(Error::invalid(
                "max_tokens",
                "must be at least 1 (leave it unset for the provider default)",
            ));
        }
        for key in self.extra.keys() {
            if RESERVED_OPTIONS.contains(&key.as_str()) {
                return Err(Error::invalid(
                    "extra",
                    format!(
                        "option `{key}` cannot be set through `extra`: use the request field instead"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The canonical JSON this request is fingerprinted from: model, messages, options
    /// (`max_tokens`, `temperature`, `extra`), tools and output schema, with object keys sorted.
    pub fn canonical_json(&self) -> Result<String> {
        let value = serde_json::json!({
            "v": 1,
            "model": self.model,
            "messages": self.messages,
            "options": {
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                "extra": self.extra,
            },
            "tools": self.tools,
            "output_schema": self.output_schema,
        });
        Ok(serde_json::to_string(&canonicalize(value))?)
    }

    /// Hex SHA-256 of [`canonical_json`](Self::canonical_json): logically equal requests have
    /// equal fingerprints; any change to the prompt, the model, an option, the tools or the
    /// output schema changes it.
    pub fn fingerprint(&self) -> Result<String> {
        Ok(hex::encode(Sha256::digest(
            self.canonical_json()?.as_bytes(),
        )))
    }

    /// The text of the last user message, if any.
    pub fn last_user_text(&self) -> Option<&str> {
        self.messages.iter().rev().find_map(|m| match m {
            Message::User { content } => Some(content.as_str()),
            _ => None,
        })
    }
}

/// Rebuild `value` with every object's keys inserted in sorted order (canonical regardless of
/// serde_json's map implementation).
fn canonicalize(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, canonicalize(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonicalize).collect()),
        other => other,
    }
}

/// Token usage of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// True when the provider reported no usage and pgcrew estimated it. The OpenAI adapter
    /// then charges the conservative bounds ([`prompt_token_bound`], [`completion_token_bound`]);
    /// the scripted model reports realistic figures (~4 characters per token).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
}

impl Usage {
    /// Reported usage.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            estimated: false,
        }
    }

    /// Prompt plus completion tokens.
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// Estimated tokens of `chars` characters of text (~4 characters per token, rounded up).
pub fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

/// Estimated prompt tokens of a request: its messages, tools and output schema at ~4 characters
/// per token, plus 4 tokens of framing per message.
pub fn estimate_prompt_tokens(request: &ModelRequest) -> u64 {
    let mut chars = 0usize;
    for m in &request.messages {
        chars += m.text().chars().count();
        if let Message::Assistant { tool_calls, .. } = m {
            for c in tool_calls {
                chars += c.name.len() + c.arguments.to_string().chars().count();
            }
        }
    }
    for t in &request.tools {
        chars +=
            t.name.len() + t.description.chars().count() + t.parameters.to_string().chars().count();
    }
    if let Some(s) = &request.output_schema {
        chars += s.name.len() + s.schema.to_string().chars().count();
    }
    estimate_tokens(chars) + 4 * request.messages.len() as u64
}

/// Tokens of chat framing allowed per message in [`prompt_token_bound`] (role markers,
/// separators, a tokenizer's word-start marker; OpenAI documents 3 to 4).
pub const BOUND_TOKENS_PER_MESSAGE: u64 = 8;
/// Tokens of framing allowed per tool definition in [`prompt_token_bound`] (the provider's
/// rendering of a function signature around its JSON schema).
pub const BOUND_TOKENS_PER_TOOL: u64 = 16;
/// Tokens of framing allowed once per request in [`prompt_token_bound`] (reply priming, the
/// wrapper of the tool list and of a structured-output schema).
pub const BOUND_TOKENS_PER_REQUEST: u64 = 16;

/// A conservative upper bound on the prompt tokens of a request, for any script: one token per
/// UTF-8 **byte** of every text the provider tokenizes (message texts, tool-call names,
/// arguments and ids, tool names, descriptions and JSON schemas, the output schema), plus
/// [`BOUND_TOKENS_PER_MESSAGE`] per message, [`BOUND_TOKENS_PER_TOOL`] per tool and
/// [`BOUND_TOKENS_PER_REQUEST`].
///
/// Why bytes: byte-level BPE tokenizers (GPT-3.5/4/4o, o-series, Llama 3, Qwen, ...) never make
/// a token smaller than one byte, and SentencePiece tokenizers with byte fallback (Llama 2,
/// Mistral, Gemma) never make one smaller than one byte either, apart from a word-start marker
/// covered by the per-message framing. So this holds for Latin, CJK, emoji, Arabic or any other
/// text, where a characters-based estimate (~4 characters per token) can undercount tenfold
/// (one CJK character is 3 bytes and often 1 to 3 tokens; one emoji is 4 or more bytes and up
/// to 4 or more tokens). For English it overestimates about fourfold; the difference is only
/// reserved, never charged (settlement charges the provider's reported usage).
pub fn prompt_token_bound(request: &ModelRequest) -> u64 {
    let mut bytes = 0u64;
    let mut add = |s: &str| bytes = bytes.saturating_add(s.len() as u64);
    for m in &request.messages {
        add(m.role());
        add(m.text());
        match m {
            Message::Assistant { tool_calls, .. } => {
                for c in tool_calls {
                    add(&c.id);
                    add(&c.name);
                    add(&c.arguments.to_string());
                }
            }
            Message::Tool { tool_call_id, .. } => add(tool_call_id),
            Message::System { .. } | Message::User { .. } => {}
        }
    }
    for t in &request.tools {
        add(&t.name);
        add(&t.description);
        add(&t.parameters.to_string());
    }
    if let Some(s) = &request.output_schema {
        add(&s.name);
        add(&s.schema.to_string());
    }
    let framing = BOUND_TOKENS_PER_REQUEST
        .saturating_add(BOUND_TOKENS_PER_MESSAGE.saturating_mul(request.messages.len() as u64))
        .saturating_add(BOUND_TOKENS_PER_TOOL.saturating_mul(request.tools.len() as u64));
    bytes.saturating_add(framing)
}

/// A conservative upper bound on the completion tokens of an answer whose usage the provider
/// did not report: one token per UTF-8 byte of the text and of the tool calls (names and JSON
/// arguments) plus [`BOUND_TOKENS_PER_MESSAGE`], and never more than the cap `max_tokens` when
/// one was sent.
pub fn completion_token_bound(
    content: Option<&str>,
    tool_calls: &[ToolCall],
    max_tokens: Option<u32>,
) -> u64 {
    let mut bytes = content.map_or(0, |c| c.len() as u64);
    for c in tool_calls {
        bytes = bytes
            .saturating_add(c.name.len() as u64)
            .saturating_add(c.arguments.to_string().len() as u64);
    }
    let bound = bytes.saturating_add(BOUND_TOKENS_PER_MESSAGE);
    match max_tokens {
        Some(cap) => bound.min(u64::from(cap)),
        None => bound,
    }
}

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A natural stop.
    Stop,
    /// `max_tokens` was reached: the output is truncated.
    Length,
    /// The model called tools.
    ToolCalls,
    /// The provider filtered the content.
    ContentFilter,
    /// Anything else (or not reported).
    Other,
}

/// A provider-neutral chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelResponse {
    /// The text answer, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool calls, with parsed JSON arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Token usage.
    pub usage: Usage,
    /// Why the model stopped.
    pub finish_reason: FinishReason,
    /// The model that answered (as reported by the provider).
    pub model: String,
}

impl ModelResponse {
    /// A text answer.
    pub fn text(model: impl Into<String>, content: impl Into<String>, usage: Usage) -> Self {
        Self {
            content: Some(content.into()),
            tool_calls: Vec::new(),
            usage,
            finish_reason: FinishReason::Stop,
            model: model.into(),
        }
    }

    /// A tool-calling answer.
    pub fn tool_calls(model: impl Into<String>, tool_calls: Vec<ToolCall>, usage: Usage) -> Self {
        Self {
            content: None,
            tool_calls,
            usage,
            finish_reason: FinishReason::ToolCalls,
            model: model.into(),
        }
    }

    /// The text content, or `""`.
    pub fn content_text(&self) -> &str {
        self.content.as_deref().unwrap_or("")
    }

    /// The cost of this call in USD under `prices` ([`Error::UnknownModelPrice`] when the
    /// model has no price).
    pub fn cost(&self, prices: &PriceTable) -> Result<f64> {
        prices.cost(
            &self.model,
            self.usage.prompt_tokens,
            self.usage.completion_tokens,
        )
    }

    /// Parse the structured output (the text content) into `T`. A missing answer, invalid
    /// JSON or JSON that does not match `T` is an [`Error::Model`] of kind `invalid_output`. A
    /// surrounding Markdown code fence (```` ```json ````), which some local models add, is
    /// tolerated.
    pub fn parse_output<T: DeserializeOwned>(&self) -> Result<T> {
        parse_structured(self.content.as_deref())
    }
}

/// Parse structured output text into `T` (see [`ModelResponse::parse_output`]).
pub fn parse_structured<T: DeserializeOwned>(content: Option<&str>) -> Result<T> {
    let Some(text) = content else {
        return Err(model_error(
            error_kind::INVALID_OUTPUT,
            "the model returned no text where structured JSON output was expected",
        ));
    };
    let json = strip_code_fence(text.trim());
    serde_json::from_str(json).map_err(|e| {
        let what = if e.is_data() {
            format!(
                "the model's JSON does not match the expected type {}",
                std::any::type_name::<T>()
            )
        } else {
            "the model returned invalid JSON".to_string()
        };
        model_error(
            error_kind::INVALID_OUTPUT,
            format!("{what}: {e}; output was: {}", truncate(text, 300)),
        )
    })
}

fn strip_code_fence(text: &str) -> &str {
    if let Some(rest) = text.strip_prefix("```")
        && let Some(body) = rest.strip_suffix("```")
    {
        // Drop an optional language tag on the first line.
        return match body.find('\n') {
            Some(nl) if !body[..nl].trim_start().starts_with(['{', '[']) => body[nl..].trim(),
            _ => body.trim(),
        };
    }
    text
}

/// The first `max` characters of `text`, with `…` when cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut s: String = text.chars().take(max).collect();
        s.push('…');
        s
    }
}

/// A chat model. Implementations: [`OpenAiModel`](crate::model::OpenAiModel) (any
/// OpenAI-compatible server) and [`ScriptedModel`](crate::model::ScriptedModel) (offline).
#[async_trait]
pub trait ModelPort: Send + Sync {
    /// A short name of this model port (for logs and the ledger).
    fn name(&self) -> &str;

    /// Run one chat completion. Errors are [`Error::InvalidInput`] for a request that fails
    /// [`ModelRequest::validate`] and [`Error::Model`] (see [`error_kind`]) for provider
    /// failures.
    async fn complete(&self, request: &ModelRequest) -> Result<ModelResponse>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> ModelRequest {
        ModelRequest::new("gpt-4o-mini")
            .system("be brief")
            .user("what is 2+2?")
            .max_tokens(100)
            .temperature(0.2)
            .tool(ToolSpec::new(
                "calc",
                "evaluates arithmetic",
                json!({"type": "object", "properties": {"expr": {"type": "string"}}}),
            ))
            .output_schema(
                "answer",
                json!({"type": "object", "properties": {"n": {"type": "integer"}}}),
            )
            .extra("top_p", json!(0.9))
    }

    #[test]
    fn fingerprint_is_stable_and_hex() {
        let a = base().fingerprint().unwrap();
        assert_eq!(a, base().fingerprint().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        // Round trip through serde (as when read back from the ledger) keeps it.
        let stored = serde_json::to_string(&base()).unwrap();
        let back: ModelRequest = serde_json::from_str(&stored).unwrap();
        assert_eq!(back.fingerprint().unwrap(), a);
    }

    #[test]
    fn fingerprint_ignores_key_order_in_schemas() {
        let mut r1 = base();
        r1.tools[0].parameters = serde_json::from_str(
            r#"{"type":"object","properties":{"a":{"type":"string"},"b":{"type":"integer"}}}"#,
        )
        .unwrap();
        let mut r2 = base();
        r2.tools[0].parameters = serde_json::from_str(
            r#"{"properties":{"b":{"type":"integer"},"a":{"type":"string"}},"type":"object"}"#,
        )
        .unwrap();
        assert_eq!(r1.fingerprint().unwrap(), r2.fingerprint().unwrap());
    }

    #[test]
    fn fingerprint_changes_with_each_part() {
        let f = base().fingerprint().unwrap();
        let mut prompt = base();
        prompt.messages[1] = Message::user("what is 2+3?");
        let mut model = base();
        model.model = "gpt-4o".into();
        let max_tokens = base().max_tokens(101);
        let temperature = base().temperature(0.3);
        let extra = base().extra("seed", json!(7));
        let mut tools = base();
        tools.tools.clear();
        let mut tool_desc = base();
        tool_desc.tools[0].description = "does arithmetic".into();
        let mut schema = base();
        schema.output_schema = None;
        let schema2 = base().output_schema(
            "answer",
            json!({"type": "object", "properties": {"n": {"type": "number"}}}),
        );
        let system = {
            let mut r = base();
            r.messages[0] = Message::system("be verbose");
            r
        };
        let mut seen = std::collections::BTreeSet::new();
        seen.insert(f.clone());
        for (what, r) in [
            ("prompt", prompt),
            ("model", model),
            ("max_tokens", max_tokens),
            ("temperature", temperature),
            ("extra", extra),
            ("tool list", tools),
            ("tool description", tool_desc),
            ("schema removed", schema),
            ("schema changed", schema2),
            ("system", system),
        ] {
            let g = r.fingerprint().unwrap();
            assert_ne!(g, f, "changing the {what} must change the fingerprint");
            assert!(seen.insert(g), "{what} collided with another variant");
        }
    }

    #[test]
    fn validate_rejects_bad_requests() {
        assert!(base().validate().is_ok());
        let cases: Vec<(ModelRequest, &str)> = vec![
            (ModelRequest::new("m"), "messages"),
            (ModelRequest::new("").user("x"), "model"),
            (base().temperature(3.0), "temperature"),
            (base().max_tokens(0), "max_tokens"),
            (base().extra("model", json!("x")), "extra"),
            (base().tool(base().tools[0].clone()), "tools"),
            (
                base().tool(ToolSpec::new("bad name", "", json!({"type": "object"}))),
                "tool name",
            ),
            (
                base().tool(ToolSpec::new("t2", "", json!("not a schema"))),
                "tool parameters",
            ),
            (
                base().message(Message::tool_result("nope", "{}")),
                "messages",
            ),
        ];
        for (r, field) in cases {
            match r.validate() {
                Err(Error::InvalidInput { field: f, message }) => {
                    assert_eq!(f, field, "{message}")
                }
                other => panic!("expected InvalidInput({field}), got {other:?}"),
            }
        }
    }

    #[test]
    fn parse_output_reports_invalid_output() {
        #[derive(Debug, Deserialize, PartialEq)]
        struct Answer {
            n: i64,
        }
        let ok = ModelResponse::text("m", r#"{"n": 4}"#, Usage::new(1, 1));
        assert_eq!(ok.parse_output::<Answer>().unwrap(), Answer { n: 4 });
        let fenced = ModelResponse::text("m", "```json\n{\"n\": 5}\n```", Usage::new(1, 1));
        assert_eq!(fenced.parse_output::<Answer>().unwrap(), Answer { n: 5 });
        for bad in ["not json", r#"{"n": "four"}"#, "{\"n\": 4"] {
            let r = ModelResponse::text("m", bad, Usage::new(1, 1));
            match r.parse_output::<Answer>() {
                Err(Error::Model { kind, .. }) => assert_eq!(kind, "invalid_output"),
                other => panic!("expected invalid_output for {bad:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn prompt_token_bound_counts_bytes_of_every_script() {
        let latin = ModelRequest::new("m").user("hello world");
        let cjk = ModelRequest::new("m").user("预算保证在边缘也成立");
        let emoji = ModelRequest::new("m").user("🤖💸👩‍💻");
        let arabic = ModelRequest::new("m").user("الميزانية");
        let framing = BOUND_TOKENS_PER_REQUEST + BOUND_TOKENS_PER_MESSAGE + "user".len() as u64;
        for (r, text) in [
            (&latin, "hello world"),
            (&cjk, "预算保证在边缘也成立"),
            (&emoji, "🤖💸👩‍💻"),
            (&arabic, "الميزانية"),
        ] {
            assert_eq!(prompt_token_bound(r), text.len() as u64 + framing, "{text}");
            // Never below the characters-based estimate.
            assert!(prompt_token_bound(r) >= estimate_prompt_tokens(r), "{text}");
        }
        // 10 CJK characters are 30 bytes: the old estimate said 3 tokens.
        assert_eq!(estimate_tokens("预算保证在边缘也成立".chars().count()), 3);
        // Tools and schemas count too.
        assert!(
            prompt_token_bound(&base())
                > prompt_token_bound(&ModelRequest::new("m").user("what is 2+2?"))
        );
        assert_eq!(
            completion_token_bound(Some("预算"), &[], None),
            6 + BOUND_TOKENS_PER_MESSAGE
        );
        assert_eq!(completion_token_bound(Some("预算"), &[], Some(3)), 3);
    }

    #[test]
    fn cost_uses_price_table() {
        let r = ModelResponse::text("gpt-4o-mini", "hi", Usage::new(1_000_000, 1_000_000));
        let cost = r.cost(&PriceTable::builtin()).unwrap();
        assert!((cost - 0.75).abs() < 1e-9, "{cost}");
        let unknown = ModelResponse::text("no-such-model", "hi", Usage::new(1, 1));
        assert!(matches!(
            unknown.cost(&PriceTable::builtin()),
            Err(Error::UnknownModelPrice(_))
        ));
    }
}
