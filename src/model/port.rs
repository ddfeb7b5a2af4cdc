//! The provider-neutral model port: chat messages, tool specs, requests, responses, usage, and the
//! [`ModelPort`] trait every adapter implements.
//!
//! All types are serde-serialisable: the kernel stores requests and responses in the ledger.
//! [`ModelRequest::fingerprint`] identifies a request for replay (same fingerprint = logically the
//! same call).

use async_trait::async_trait;

use crate::error::{Error, Result};

pub use super::message::{Message, OutputSchema, ToolCall, ToolSpec};
pub use super::request::ModelRequest;
pub use super::response::{FinishReason, ModelResponse, Usage, parse_structured};
pub use super::tokens::{
    BOUND_TOKENS_PER_MESSAGE, BOUND_TOKENS_PER_REQUEST, BOUND_TOKENS_PER_TOOL,
    completion_token_bound, estimate_prompt_tokens, estimate_tokens, prompt_token_bound,
};

/// The kinds of [`Error::Model`]: each has a stable string (its `kind`, recorded in the ledger
/// as `model_failed.kind`), also available as the [`error_kind`] constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelErrorKind {
    /// The provider rate-limited the call (HTTP 429); retried with backoff.
    RateLimited,
    /// The account has no quota left (HTTP 429 `insufficient_quota`); not retried.
    QuotaExceeded,
    /// The provider failed (HTTP 5xx); retried with backoff.
    Server,
    /// The call did not finish within the per-request timeout; retried with backoff.
    Timeout,
    /// The provider could not be reached or the connection broke; retried with backoff.
    Connection,
    /// The provider rejected the credentials (HTTP 401/403).
    Auth,
    /// The provider (or pgcrew, before sending) rejected the request as malformed.
    InvalidRequest,
    /// The provider answered with something that is not a chat completion.
    InvalidResponse,
    /// The model's output is unusable: invalid JSON, JSON not matching the expected type, or
    /// tool-call arguments that are not JSON.
    InvalidOutput,
    /// A scripted model ran out of scripted replies.
    ScriptExhausted,
}

impl ModelErrorKind {
    /// Every kind.
    pub const ALL: [ModelErrorKind; 10] = [
        Self::RateLimited,
        Self::QuotaExceeded,
        Self::Server,
        Self::Timeout,
        Self::Connection,
        Self::Auth,
        Self::InvalidRequest,
        Self::InvalidResponse,
        Self::InvalidOutput,
        Self::ScriptExhausted,
    ];

    /// The kind's stable string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
            Self::Server => "server",
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::Auth => "auth",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidResponse => "invalid_response",
            Self::InvalidOutput => "invalid_output",
            Self::ScriptExhausted => "script_exhausted",
        }
    }

    /// The kind named by `kind`, if it is one of pgcrew's.
    pub fn parse(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == kind)
    }

    /// The kind of an [`Error::Model`] (`None` for other errors and unknown kinds).
    pub fn of(error: &Error) -> Option<Self> {
        match error {
            Error::Model { kind, .. } => Self::parse(kind),
            _ => None,
        }
    }

    /// True for the kinds that are transient and worth retrying.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited | Self::Server | Self::Timeout | Self::Connection
        )
    }
}

crate::error::display_as_str!(ModelErrorKind);

/// The `kind` strings of [`Error::Model`] ([`ModelErrorKind::as_str`]), as produced by the
/// adapters in this module.
pub mod error_kind {
    use super::ModelErrorKind;

    /// [`ModelErrorKind::RateLimited`].
    pub const RATE_LIMITED: &str = ModelErrorKind::RateLimited.as_str();
    /// [`ModelErrorKind::QuotaExceeded`].
    pub const QUOTA_EXCEEDED: &str = ModelErrorKind::QuotaExceeded.as_str();
    /// [`ModelErrorKind::Server`].
    pub const SERVER: &str = ModelErrorKind::Server.as_str();
    /// [`ModelErrorKind::Timeout`].
    pub const TIMEOUT: &str = ModelErrorKind::Timeout.as_str();
    /// [`ModelErrorKind::Connection`].
    pub const CONNECTION: &str = ModelErrorKind::Connection.as_str();
    /// [`ModelErrorKind::Auth`].
    pub const AUTH: &str = ModelErrorKind::Auth.as_str();
    /// [`ModelErrorKind::InvalidRequest`].
    pub const INVALID_REQUEST: &str = ModelErrorKind::InvalidRequest.as_str();
    /// [`ModelErrorKind::InvalidResponse`].
    pub const INVALID_RESPONSE: &str = ModelErrorKind::InvalidResponse.as_str();
    /// [`ModelErrorKind::InvalidOutput`].
    pub const INVALID_OUTPUT: &str = ModelErrorKind::InvalidOutput.as_str();
    /// [`ModelErrorKind::ScriptExhausted`].
    pub const SCRIPT_EXHAUSTED: &str = ModelErrorKind::ScriptExhausted.as_str();

    /// True for the kinds that are transient and worth retrying.
    pub fn is_retryable(kind: &str) -> bool {
        ModelErrorKind::parse(kind).is_some_and(ModelErrorKind::is_retryable)
    }
}

/// Shorthand for an [`Error::Model`].
pub fn model_error(kind: &str, message: impl Into<String>) -> Error {
    Error::Model {
        kind: kind.to_string(),
        message: message.into(),
    }
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
