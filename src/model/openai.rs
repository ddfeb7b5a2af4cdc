//! The OpenAI-compatible adapter (chat completions through the `async-openai` crate): works
//! with OpenAI and with any compatible server (vLLM, Ollama, LM Studio, llama.cpp, ...).
//!
//! ```no_run
//! use std::time::Duration;
//! use pgcrew::model::{ModelPort, ModelRequest, OpenAiConfig, OpenAiModel};
//!
//! # async fn demo() -> pgcrew::Result<()> {
//! // Base URL and key from OPENAI_BASE_URL / OPENAI_API_KEY, overridable in the builder.
//! let config = OpenAiConfig::from_env().timeout(Duration::from_secs(30)).build()?;
//! let model = OpenAiModel::new(config);
//! let answer = model
//!     .complete(&ModelRequest::new("gpt-4o-mini").user("Say hi").max_tokens(20))
//!     .await?;
//! println!("{} ({} tokens)", answer.content_text(), answer.usage.total());
//! # Ok(())
//! # }
//! ```
//!
//! Retries: 429 (rate limited), 5xx, timeouts and connection errors are retried with
//! exponential backoff and jitter, up to `max_retries` times (so at most `max_retries + 1`
//! HTTP requests per call). async-openai's own retry layer is replaced by a plain transport,
//! so no request is retried twice over.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::ReqwestService;
use async_openai::types::chat::{
    ChatCompletionMessageToolCall, ChatCompletionMessageToolCalls,
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestSystemMessageContent, ChatCompletionRequestToolMessage,
    ChatCompletionRequestToolMessageContent, ChatCompletionRequestUserMessage,
    ChatCompletionRequestUserMessageContent, ChatCompletionTool, ChatCompletionTools,
    CreateChatCompletionRequest, CreateChatCompletionResponse, FinishReason as OaiFinishReason,
    FunctionCall, FunctionObject, ResponseFormat, ResponseFormatJsonSchema,
};
use async_trait::async_trait;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::port::{
    FinishReason, Message, ModelPort, ModelRequest, ModelResponse, ToolCall, Usage,
    completion_token_bound, error_kind, model_error, prompt_token_bound, truncate,
};

/// Configuration of an [`OpenAiModel`]. Build it with [`OpenAiConfig::builder`] (nothing from
/// the environment) or [`OpenAiConfig::from_env`] (base URL and key from the environment).
#[derive(Clone)]
pub struct OpenAiConfig {
    base_url: String,
    api_key: String,
    organization: Option<String>,
    project: Option<String>,
    timeout: Duration,
    max_retries: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    name: String,
    max_completion_tokens: bool,
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field(
                "api_key",
                &if self.api_key.is_empty() {
                    "<none>"
                } else {
                    "<redacted>"
                },
            )
            .field("organization", &self.organization)
            .field("project", &self.project)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("name", &self.name)
            .finish()
    }
}

impl OpenAiConfig {
    /// Default base URL: OpenAI's API.
    pub const DEFAULT_BASE_URL: &'static str = "https://api.openai.com/v1";
    /// Default per-request timeout: 60 s (each HTTP attempt gets the full timeout).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default number of retries after the first attempt: 3.
    pub const DEFAULT_MAX_RETRIES: u32 = 3;
    /// Default backoff before the first retry: 500 ms (doubling per retry, with jitter).
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(500);
    /// Default cap on one backoff: 20 s.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(20);
    /// Most retries accepted.
    pub const MAX_RETRIES_LIMIT: u32 = 20;

    /// A builder with the documented defaults and nothing read from the environment.
    pub fn builder() -> OpenAiConfigBuilder {
        OpenAiConfigBuilder::default()
    }

    /// A builder whose base URL, API key, organization and project come from the process
    /// environment (`OPENAI_BASE_URL`, `OPENAI_API_KEY`, `OPENAI_ORG_ID`, `OPENAI_PROJECT_ID`)
    /// when set; builder setters called afterwards take precedence.
    pub fn from_env() -> OpenAiConfigBuilder {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// Like [`from_env`](Self::from_env) with an explicit variable map (for tests and for
    /// configuration files).
    pub fn from_env_map(vars: &HashMap<String, String>) -> OpenAiConfigBuilder {
        Self::from_env_with(|k| vars.get(k).cloned())
    }

    /// Like [`from_env`](Self::from_env) with a lookup function.
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> OpenAiConfigBuilder {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let mut b = OpenAiConfigBuilder::default();
        if let Some(url) = get("OPENAI_BASE_URL") {
            b.base_url = url;
        }
        if let Some(key) = get("OPENAI_API_KEY") {
            b.api_key = key;
        }
        b.organization = get("OPENAI_ORG_ID");
        b.project = get("OPENAI_PROJECT_ID");
        b
    }

    /// The base URL (requests go to `<base_url>/chat/completions`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Whether an API key is configured.
    pub fn has_api_key(&self) -> bool {
        !self.api_key.is_empty()
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Retries after the first attempt.
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// The port name reported by [`ModelPort::name`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backoff before retry number `retry` (0-based): `initial * 2^retry`, capped at
    /// `max_backoff`, with "equal jitter" (a uniformly random delay between half and all of it).
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(retry.min(30)))
            .min(self.max_backoff);
        let half = base / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(fastrand::u64(0..=jitter_ms))
    }
}

/// Builder of [`OpenAiConfig`].
#[derive(Clone)]
pub struct OpenAiConfigBuilder {
    base_url: String,
    api_key: String,
    organization: Option<String>,
    project: Option<String>,
    timeout: Duration,
    max_retries: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    name: String,
    max_completion_tokens: bool,
}

impl fmt::Debug for OpenAiConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfigBuilder")
            .field("base_url", &self.base_url)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .finish_non_exhaustive()
    }
}

impl Default for OpenAiConfigBuilder {
    fn default() -> Self {
        Self {
            base_url: OpenAiConfig::DEFAULT_BASE_URL.to_string(),
            api_key: String::new(),
            organization: None,
            project: None,
            timeout: OpenAiConfig::DEFAULT_TIMEOUT,
            max_retries: OpenAiConfig::DEFAULT_MAX_RETRIES,
            initial_backoff: OpenAiConfig::DEFAULT_INITIAL_BACKOFF,
            max_backoff: OpenAiConfig::DEFAULT_MAX_BACKOFF,
            name: "openai".to_string(),
            max_completion_tokens: false,
        }
    }
}

fn header_safe(field: &'static str, value: &str) -> Result<()> {
    if value.chars().all(|c| c.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "must consist of printable ASCII characters without spaces",
        ))
    }
}

impl OpenAiConfigBuilder {
    /// Base URL of the OpenAI-compatible API, including the version path
    /// (`https://api.openai.com/v1`, `http://localhost:11434/v1` for Ollama,
    /// `http://localhost:8000/v1` for vLLM). Default: [`OpenAiConfig::DEFAULT_BASE_URL`].
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = url.into();
        self
    }

    /// API key sent as `Authorization: Bearer <key>`. Default: none (local servers usually
    /// need none).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = key.into();
        self
    }

    /// OpenAI organization id (`OpenAI-Organization` header). Default: none.
    pub fn organization(mut self, org: impl Into<String>) -> Self {
        self.organization = Some(org.into());
        self
    }

    /// OpenAI project id (`OpenAI-Project` header). Default: none.
    pub fn project(mut self, project: impl Into<String>) -> Self {
        self.project = Some(project.into());
        self
    }

    /// Timeout of each HTTP attempt. Default: 60 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Retries after the first attempt on 429 / 5xx / timeout / connection errors. Default: 3.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Backoff before the first retry (doubles per retry, with jitter). Default: 500 ms.
    pub fn initial_backoff(mut self, backoff: Duration) -> Self {
        self.initial_backoff = backoff;
        self
    }

    /// Cap on one backoff. Default: 20 s.
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// Name reported by [`ModelPort::name`]. Default: `openai`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Send the request's `max_tokens` as `max_completion_tokens` (required by OpenAI's
    /// reasoning models such as o1/o3) instead of `max_tokens` (understood by every
    /// OpenAI-compatible server). Default: false (`max_tokens`).
    pub fn max_completion_tokens(mut self, yes: bool) -> Self {
        self.max_completion_tokens = yes;
        self
    }

    /// Validate and build.
    pub fn build(self) -> Result<OpenAiConfig> {
        let base_url = self.base_url.trim().trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://"))
            || base_url.len() <= "https://".len()
        {
            return Err(Error::invalid(
                "base_url",
                format!(
                    "`{}` is not an http(s) URL (e.g. https://api.openai.com/v1 or http://localhost:11434/v1)",
                    self.base_url
                ),
            ));
        }
        if base_url
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::invalid(
                "base_url",
                "must not contain whitespace or control characters",
            ));
        }
        header_safe("api_key", &self.api_key)?;
        if let Some(o) = &self.organization {
            header_safe("organization", o)?;
        }
        if let Some(p) = &self.project {
            header_safe("project", p)?;
        }
        if self.timeout.is_zero() {
            return Err(Error::invalid("timeout", "must be greater than zero"));
        }
        if self.max_retries > OpenAiConfig::MAX_RETRIES_LIMIT {
            return Err(Error::invalid(
                "max_retries",
                format!(
                    "{} is above the limit of {}",
                    self.max_retries,
                    OpenAiConfig::MAX_RETRIES_LIMIT
                ),
            ));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(Error::invalid(
                "initial_backoff",
                format!(
                    "{:?} is larger than max_backoff {:?}",
                    self.initial_backoff, self.max_backoff
                ),
            ));
        }
        crate::ids::validate_text_id("name", &self.name)?;
        Ok(OpenAiConfig {
            base_url,
            api_key: self.api_key,
            organization: self.organization,
            project: self.project,
            timeout: self.timeout,
            max_retries: self.max_retries,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            name: self.name,
            max_completion_tokens: self.max_completion_tokens,
        })
    }
}

/// A [`ModelPort`] backed by an OpenAI-compatible chat completions API.
#[derive(Clone)]
pub struct OpenAiModel {
    client: async_openai::Client<OpenAIConfig>,
    config: OpenAiConfig,
}

impl fmt::Debug for OpenAiModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiModel")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl OpenAiModel {
    /// An adapter with `config`.
    pub fn new(config: OpenAiConfig) -> Self {
        // OpenAIConfig::new() reads the environment itself; every field is overridden so the
        // pgcrew config is the only source.
        let oai = OpenAIConfig::new()
            .with_api_base(config.base_url.clone())
            .with_api_key(config.api_key.clone())
            .with_org_id(config.organization.clone().unwrap_or_default())
            .with_project_id(config.project.clone().unwrap_or_default());
        // A plain transport: pgcrew does the retries (async-openai's default client would
        // retry 429/5xx a further 3 times under each of ours).
        let client =
            async_openai::Client::with_config(oai).with_http_service(ReqwestService::default());
        Self { client, config }
    }

    /// An adapter configured from the environment with the defaults
    /// ([`OpenAiConfig::from_env`]).
    pub fn from_env() -> Result<Self> {
        Ok(Self::new(OpenAiConfig::from_env().build()?))
    }

    /// The configuration.
    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }

    async fn attempt(&self, body: &Value) -> Result<CreateChatCompletionResponse> {
        let chat = self.client.chat();
        let call = chat.create_byot::<&Value, CreateChatCompletionResponse>(body);
        match tokio::time::timeout(self.config.timeout, call).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(e, &self.config)),
            Err(_) => Err(model_error(
                error_kind::TIMEOUT,
                format!(
                    "no response from {} within {:?} (raise the timeout with OpenAiConfigBuilder::timeout)",
                    self.config.base_url, self.config.timeout
                ),
            )),
        }
    }
}

/// The error kind of a model error, if it is one.
fn kind_of(e: &Error) -> Option<&str> {
    match e {
        Error::Model { kind, .. } => Some(kind),
        _ => None,
    }
}

/// Map an async-openai error to a typed [`Error::Model`].
fn classify(e: OpenAIError, config: &OpenAiConfig) -> Error {
    match e {
        OpenAIError::ApiError(resp) => {
            let status = resp.status_code.as_u16();
            let msg = format!(
                "HTTP {status} from {}: {}",
                config.base_url,
                truncate(&resp.api_error.to_string(), 500)
            );
            let kind = match status {
                429 if resp.api_error.r#type.as_deref() == Some("insufficient_quota")
                    || resp.api_error.code.as_deref() == Some("insufficient_quota") =>
                {
                    error_kind::QUOTA_EXCEEDED
                }
                429 => error_kind::RATE_LIMITED,
                401 | 403 => {
                    return model_error(
                        error_kind::AUTH,
                        format!(
                            "{msg} (check the API key: OpenAiConfigBuilder::api_key or OPENAI_API_KEY)"
                        ),
                    );
                }
                408 => error_kind::TIMEOUT,
                500..=599 => error_kind::SERVER,
                _ => error_kind::INVALID_REQUEST,
            };
            model_error(kind, msg)
        }
        OpenAIError::Reqwest(re) => {
            let kind = if re.is_timeout() {
                error_kind::TIMEOUT
            } else if re.is_builder() {
                error_kind::INVALID_REQUEST
            } else if re.is_decode() {
                error_kind::INVALID_RESPONSE
            } else {
                // connect, request, body: the transport failed.
                error_kind::CONNECTION
            };
            let mut msg = format!("{re}");
            let mut src = std::error::Error::source(&re);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            model_error(
                kind,
                format!("request to {} failed: {msg}", config.base_url),
            )
        }
        OpenAIError::JSONDeserialize(err, content) => model_error(
            error_kind::INVALID_RESPONSE,
            format!(
                "{} did not answer with a chat completion ({err}); body was: {}",
                config.base_url,
                truncate(&content, 500)
            ),
        ),
        OpenAIError::InvalidArgument(m) => model_error(error_kind::INVALID_REQUEST, m),
        OpenAIError::Boxed(b) => model_error(
            error_kind::CONNECTION,
            format!("request to {} failed: {b}", config.base_url),
        ),
        other => model_error(error_kind::INVALID_REQUEST, other.to_string()),
    }
}

/// The chat completions body for `request` (typed through async-openai, then merged with the
/// request's free-form `extra` options).
fn request_body(request: &ModelRequest, max_completion_tokens: bool) -> Result<Value> {
    let messages = request
        .messages
        .iter()
        .map(to_oai_message)
        .collect::<Result<Vec<_>>>()?;
    let tools = (!request.tools.is_empty()).then(|| {
        request
            .tools
            .iter()
            .map(|t| {
                ChatCompletionTools::Function(ChatCompletionTool {
                    function: FunctionObject {
                        name: t.name.clone(),
                        description: (!t.description.is_empty()).then(|| t.description.clone()),
                        parameters: Some(t.parameters.clone()),
                        strict: None,
                    },
                })
            })
            .collect()
    });
    let response_format = request
        .output_schema
        .as_ref()
        .map(|s| ResponseFormat::JsonSchema {
            json_schema: ResponseFormatJsonSchema {
                description: None,
                name: s.name.clone(),
                schema: s.schema.clone(),
                strict: s.strict.then_some(true),
            },
        });
    let typed = CreateChatCompletionRequest {
        messages,
        model: request.model.clone(),
        // Rewritten to `max_tokens` below unless the config asks for max_completion_tokens:
        // `max_tokens` (deprecated by OpenAI) is what every compatible server understands, and
        // OpenAI still accepts it for non-reasoning models.
        max_completion_tokens: request.max_tokens,
        temperature: request.temperature.map(|t| t as f32),
        tools,
        response_format,
        ..Default::default()
    };
    let mut body = serde_json::to_value(&typed)?;
    if let Value::Object(map) = &mut body {
        if let Some(t) = request.temperature {
            // Keep the exact f64 the caller gave (f32 widening would send 0.699999988...).
            map.insert("temperature".into(), Value::from(t));
        }
        if let Some(m) = request.max_tokens
            && !max_completion_tokens
        {
            map.insert("max_tokens".into(), Value::from(m));
            map.remove("max_completion_tokens");
        }
        for (k, v) in &request.extra {
            map.insert(k.clone(), v.clone());
        }
    }
    Ok(body)
}

fn to_oai_message(m: &Message) -> Result<ChatCompletionRequestMessage> {
    Ok(match m {
        Message::System { content } => {
            ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage {
                content: ChatCompletionRequestSystemMessageContent::Text(content.clone()),
                name: None,
            })
        }
        Message::User { content } => {
            ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
                content: ChatCompletionRequestUserMessageContent::Text(content.clone()),
                name: None,
            })
        }
        Message::Assistant {
            content,
            tool_calls,
        } => {
            let calls = tool_calls
                .iter()
                .map(|c| {
                    Ok(ChatCompletionMessageToolCalls::Function(
                        ChatCompletionMessageToolCall {
                            id: c.id.clone(),
                            function: FunctionCall {
                                name: c.name.clone(),
                                arguments: serde_json::to_string(&c.arguments)?,
                            },
                        },
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            ChatCompletionRequestMessage::Assistant(ChatCompletionRequestAssistantMessage {
                content: content
                    .clone()
                    .map(ChatCompletionRequestAssistantMessageContent::Text),
                tool_calls: (!calls.is_empty()).then_some(calls),
                ..Default::default()
            })
        }
        Message::Tool {
            tool_call_id,
            content,
        } => ChatCompletionRequestMessage::Tool(ChatCompletionRequestToolMessage {
            content: ChatCompletionRequestToolMessageContent::Text(content.clone()),
            tool_call_id: tool_call_id.clone(),
        }),
    })
}

fn from_oai_response(
    request: &ModelRequest,
    resp: CreateChatCompletionResponse,
) -> Result<ModelResponse> {
    let Some(choice) = resp.choices.into_iter().next() else {
        return Err(model_error(
            error_kind::INVALID_RESPONSE,
            "the provider returned a chat completion with no choices",
        ));
    };
    let msg = choice.message;
    let mut tool_calls = Vec::new();
    for call in msg.tool_calls.unwrap_or_default() {
        match call {
            ChatCompletionMessageToolCalls::Function(f) => {
                let raw = f.function.arguments.trim();
                let arguments = if raw.is_empty() {
                    Value::Object(Default::default())
                } else {
                    serde_json::from_str(raw).map_err(|e| {
                        model_error(
                            error_kind::INVALID_OUTPUT,
                            format!(
                                "the model called tool `{}` with arguments that are not valid JSON ({e}): {}",
                                f.function.name,
                                truncate(raw, 300)
                            ),
                        )
                    })?
                };
                tool_calls.push(ToolCall {
                    id: f.id,
                    name: f.function.name,
                    arguments,
                });
            }
            ChatCompletionMessageToolCalls::Custom(c) => tool_calls.push(ToolCall {
                id: c.id,
                name: c.custom_tool.name,
                arguments: Value::String(c.custom_tool.input),
            }),
        }
    }
    let content = match (msg.content, msg.refusal) {
        (Some(c), _) => Some(c),
        (None, Some(r)) => Some(r),
        (None, None) => None,
    };
    let finish_reason = match choice.finish_reason {
        Some(OaiFinishReason::Stop) => FinishReason::Stop,
        Some(OaiFinishReason::Length) => FinishReason::Length,
        Some(OaiFinishReason::ToolCalls) | Some(OaiFinishReason::FunctionCall) => {
            FinishReason::ToolCalls
        }
        Some(OaiFinishReason::ContentFilter) => FinishReason::ContentFilter,
        None if !tool_calls.is_empty() => FinishReason::ToolCalls,
        None => FinishReason::Other,
    };
    let usage = match resp.usage {
        Some(u) => Usage::new(u64::from(u.prompt_tokens), u64::from(u.completion_tokens)),
        // No usage reported: charge the conservative bounds (never less than was really used,
        // never more than was reserved for).
        None => Usage {
            prompt_tokens: prompt_token_bound(request),
            completion_tokens: completion_token_bound(
                content.as_deref(),
                &tool_calls,
                request.max_tokens,
            ),
            estimated: true,
        },
    };
    Ok(ModelResponse {
        content,
        tool_calls,
        usage,
        finish_reason,
        model: if resp.model.is_empty() {
            request.model.clone()
        } else {
            resp.model
        },
    })
}

#[async_trait]
impl ModelPort for OpenAiModel {
    fn name(&self) -> &str {
        &self.config.name
    }

    async fn complete(&self, request: &ModelRequest) -> Result<ModelResponse> {
        request.validate()?;
        let body = request_body(request, self.config.max_completion_tokens)?;
        let mut retry = 0u32;
        loop {
            match self.attempt(&body).await {
                Ok(resp) => return from_oai_response(request, resp),
                Err(e) => {
                    let retryable = kind_of(&e).is_some_and(error_kind::is_retryable);
                    if !retryable || retry >= self.config.max_retries {
                        if retry > 0 {
                            tracing::warn!(model = %request.model, attempts = retry + 1, error = %e, "model call failed");
                        }
                        return Err(e);
                    }
                    let delay = self.config.backoff(retry);
                    tracing::info!(model = %request.model, retry = retry + 1, ?delay, error = %e, "retrying model call");
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builder_defaults_and_validation() {
        let c = OpenAiConfig::builder().build().unwrap();
        assert_eq!(c.base_url(), "https://api.openai.com/v1");
        assert_eq!(c.timeout(), Duration::from_secs(60));
        assert_eq!(c.max_retries(), 3);
        assert!(!c.has_api_key());
        assert!(!format!("{c:?}").contains("sk-"));
        let with_key = OpenAiConfig::builder()
            .api_key("sk-secret")
            .build()
            .unwrap();
        assert!(!format!("{with_key:?}").contains("sk-secret"));
        for (b, field) in [
            (OpenAiConfig::builder().base_url("ftp://x"), "base_url"),
            (OpenAiConfig::builder().api_key("a b"), "api_key"),
            (OpenAiConfig::builder().timeout(Duration::ZERO), "timeout"),
            (OpenAiConfig::builder().max_retries(1000), "max_retries"),
            (
                OpenAiConfig::builder()
                    .initial_backoff(Duration::from_secs(5))
                    .max_backoff(Duration::from_secs(1)),
                "initial_backoff",
            ),
        ] {
            match b.build() {
                Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected InvalidInput({field}), got {other:?}"),
            }
        }
    }

    #[test]
    fn env_map_then_builder_override() {
        let vars: HashMap<String, String> = [
            ("OPENAI_BASE_URL", "http://localhost:11434/v1/"),
            ("OPENAI_API_KEY", "sk-env"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = OpenAiConfig::from_env_map(&vars).build().unwrap();
        assert_eq!(c.base_url(), "http://localhost:11434/v1");
        assert_eq!(c.api_key, "sk-env");
        let c = OpenAiConfig::from_env_map(&vars)
            .base_url("http://vllm:8000/v1")
            .build()
            .unwrap();
        assert_eq!(c.base_url(), "http://vllm:8000/v1");
        assert_eq!(c.api_key, "sk-env");
    }

    #[test]
    fn backoff_grows_with_jitter_and_cap() {
        let c = OpenAiConfig::builder()
            .initial_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_millis(1000))
            .build()
            .unwrap();
        for _ in 0..50 {
            let b0 = c.backoff(0);
            assert!(b0 >= Duration::from_millis(50) && b0 <= Duration::from_millis(100));
            let b2 = c.backoff(2);
            assert!(b2 >= Duration::from_millis(200) && b2 <= Duration::from_millis(400));
            let b9 = c.backoff(9);
            assert!(b9 >= Duration::from_millis(500) && b9 <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn body_carries_tools_schema_options_and_extra() {
        let req = ModelRequest::new("gpt-4o-mini")
            .system("sys")
            .user("hi")
            .message(Message::assistant_tool_calls(vec![ToolCall::new(
                "call_1",
                "lookup",
                json!({"q": "x"}),
            )]))
            .message(Message::tool_result("call_1", "{\"ok\":true}"))
            .tool(ToolSpec::new(
                "lookup",
                "look up",
                json!({"type": "object"}),
            ))
            .output_schema("out", json!({"type": "object"}))
            .max_tokens(50)
            .temperature(0.7)
            .extra("top_k", json!(5));
        let body = request_body(&req, false).unwrap();
        assert_eq!(body["model"], "gpt-4o-mini");
        assert_eq!(body["max_tokens"], 50);
        assert!(body.get("max_completion_tokens").is_none());
        assert_eq!(body["temperature"], json!(0.7));
        assert_eq!(body["top_k"], 5);
        assert_eq!(body["tools"][0]["type"], "function");
        assert_eq!(body["tools"][0]["function"]["name"], "lookup");
        assert_eq!(body["response_format"]["type"], "json_schema");
        assert_eq!(body["response_format"]["json_schema"]["name"], "out");
        let msgs = body["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[2]["role"], "assistant");
        assert_eq!(msgs[2]["tool_calls"][0]["id"], "call_1");
        assert_eq!(
            msgs[2]["tool_calls"][0]["function"]["arguments"],
            "{\"q\":\"x\"}"
        );
        assert_eq!(msgs[3]["role"], "tool");
        assert_eq!(msgs[3]["tool_call_id"], "call_1");
        let reasoning = request_body(&req, true).unwrap();
        assert_eq!(reasoning["max_completion_tokens"], 50);
        assert!(reasoning.get("max_tokens").is_none());
    }

    use crate::model::port::ToolSpec;
}
