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
//! Retries: 429 (rate limited), 5xx, timeouts, connection errors and cut streams are retried
//! with exponential backoff and jitter, up to `max_retries` times (so at most `max_retries + 1`
//! HTTP requests per call); a 429 or 503 carrying `Retry-After` (seconds or an HTTP date) waits
//! that long instead, unless it asks for more than `max_retry_after` (the call then fails at
//! once). async-openai's own retry layer is replaced by a plain transport, so no request is
//! retried twice over.
//!
//! Streaming ([`ModelPort::stream`]): the same call with `stream: true` and
//! `stream_options.include_usage`, over async-openai's chat completion stream; text is handed
//! to the sink as it arrives and the result is the same [`ModelResponse`] (usage from the last
//! chunk). A stream that breaks off is [`ModelErrorKind::StreamCut`], retried like a
//! connection error after a [`ModelDelta::Retry`] tells the sink to drop the partial text.

use std::fmt;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::CreateChatCompletionResponse;
use async_trait::async_trait;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::port::{
    DeltaSink, ModelDelta, ModelErrorKind, ModelPort, ModelRequest, ModelResponse, model_error,
    truncate,
};

mod config;
mod retry_after;
mod stream;
mod wire;

pub use retry_after::parse_retry_after;

pub use config::{OpenAiConfig, OpenAiConfigBuilder};
use wire::{from_oai_response, request_body};

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
        let client = async_openai::Client::with_config(oai)
            .with_http_service(retry_after::RetryAfterService::default());
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
            Err(_) => Err(self.timed_out("no response")),
        }
    }

    /// The timeout error: `what` did not arrive in time.
    fn timed_out(&self, what: &str) -> Error {
        model_error(
            ModelErrorKind::Timeout,
            format!(
                "{what} from {} within {:?} (raise the timeout with OpenAiConfigBuilder::timeout)",
                self.config.base_url, self.config.timeout
            ),
        )
    }

    /// Run `attempt(n)` for n = 0, 1, ... until it succeeds, fails for good or the retries are
    /// used up; between attempts wait the response's `Retry-After` or else the backoff.
    async fn with_retries<F, Fut>(
        &self,
        request: &ModelRequest,
        mut attempt: F,
    ) -> Result<ModelResponse>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<ModelResponse>>,
    {
        let mut retry = 0u32;
        loop {
            let (result, retry_after) = retry_after::capture(attempt(retry)).await;
            let e = match result {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            let retryable = ModelErrorKind::of(&e).is_some_and(ModelErrorKind::is_retryable);
            if !retryable || retry >= self.config.max_retries {
                if retry > 0 {
                    tracing::warn!(model = %request.model, attempts = retry + 1, error = %e, "model call failed");
                }
                return Err(e);
            }
            let delay = match retry_after {
                Some(d) if d > self.config.max_retry_after => {
                    return Err(model_error(
                        ModelErrorKind::of(&e).unwrap_or(ModelErrorKind::RateLimited),
                        format!(
                            "{e} (the provider asks to retry after {d:?}, more than max_retry_after {:?})",
                            self.config.max_retry_after
                        ),
                    ));
                }
                Some(d) => d,
                None => self.config.backoff(retry),
            };
            tracing::info!(model = %request.model, retry = retry + 1, ?delay, retry_after = retry_after.is_some(), error = %e, "retrying model call");
            tokio::time::sleep(delay).await;
            retry += 1;
        }
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
                    ModelErrorKind::QuotaExceeded
                }
                429 => ModelErrorKind::RateLimited,
                401 | 403 => {
                    return model_error(
                        ModelErrorKind::Auth,
                        format!(
                            "{msg} (check the API key: OpenAiConfigBuilder::api_key or OPENAI_API_KEY)"
                        ),
                    );
                }
                408 => ModelErrorKind::Timeout,
                500..=599 => ModelErrorKind::Server,
                _ => ModelErrorKind::InvalidRequest,
            };
            model_error(kind, msg)
        }
        OpenAIError::Reqwest(re) => {
            let kind = if re.is_timeout() {
                ModelErrorKind::Timeout
            } else if re.is_builder() {
                ModelErrorKind::InvalidRequest
            } else if re.is_decode() {
                ModelErrorKind::InvalidResponse
            } else {
                // connect, request, body: the transport failed.
                ModelErrorKind::Connection
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
            ModelErrorKind::InvalidResponse,
            format!(
                "{} did not answer with a chat completion ({err}); body was: {}",
                config.base_url,
                truncate(&content, 500)
            ),
        ),
        OpenAIError::InvalidArgument(m) => model_error(ModelErrorKind::InvalidRequest, m),
        OpenAIError::Boxed(b) => model_error(
            ModelErrorKind::Connection,
            format!("request to {} failed: {b}", config.base_url),
        ),
        other => model_error(ModelErrorKind::InvalidRequest, other.to_string()),
    }
}
#[async_trait]
impl ModelPort for OpenAiModel {
    fn name(&self) -> &str {
        &self.config.name
    }

    async fn complete(&self, request: &ModelRequest) -> Result<ModelResponse> {
        request.validate()?;
        let body = request_body(request, self.config.max_completion_tokens)?;
        self.with_retries(request, |_| async {
            from_oai_response(request, self.attempt(&body).await?)
        })
        .await
    }

    async fn stream(&self, request: &ModelRequest, sink: &DeltaSink) -> Result<ModelResponse> {
        request.validate()?;
        let body = stream::stream_body(request_body(request, self.config.max_completion_tokens)?);
        self.with_retries(request, |n| {
            if n > 0 {
                sink(ModelDelta::Retry {
                    attempt: n,
                    reason: "the previous attempt failed; its partial output is void".into(),
                });
            }
            self.stream_attempt(request, &body, sink)
        })
        .await
    }
}
