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
pub use super::stream::{DeltaSink, ModelDelta};
pub use super::tokens::{
    BOUND_TOKENS_PER_MESSAGE, BOUND_TOKENS_PER_REQUEST, BOUND_TOKENS_PER_TOOL,
    completion_token_bound, estimate_prompt_tokens, estimate_tokens, prompt_token_bound,
};

pub use crate::vocab::ModelErrorKind;

impl ModelErrorKind {
    /// The kind named by `kind`, if it is one of pgcrew's.
    pub fn parse(kind: &str) -> Option<Self> {
        Self::from_name(kind)
    }

    /// The kind of an [`Error::Model`] (`None` for other errors).
    pub fn of(error: &Error) -> Option<Self> {
        match error {
            Error::Model { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

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
    /// [`ModelErrorKind::StreamCut`].
    pub const STREAM_CUT: &str = ModelErrorKind::StreamCut.as_str();

    /// True for the kinds that are transient and worth retrying.
    pub fn is_retryable(kind: &str) -> bool {
        ModelErrorKind::parse(kind).is_some_and(ModelErrorKind::is_retryable)
    }
}

/// Shorthand for an [`Error::Model`].
pub fn model_error(kind: ModelErrorKind, message: impl Into<String>) -> Error {
    Error::Model {
        kind,
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

    /// Run one chat completion, handing the answer to `sink` piece by piece while it is
    /// produced; the result is what [`complete`](Self::complete) would return. The default
    /// calls `complete` and hands the whole text over as one delta; adapters that can stream
    /// (the OpenAI adapter) override it.
    async fn stream(&self, request: &ModelRequest, sink: &DeltaSink) -> Result<ModelResponse> {
        let response = self.complete(request).await?;
        if let Some(text) = response.content.as_deref().filter(|t| !t.is_empty()) {
            sink(ModelDelta::text(text));
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_errors_carry_their_kind_and_show_its_name() {
        let e = model_error(ModelErrorKind::RateLimited, "slow down");
        assert_eq!(
            e.to_string(),
            "model provider error (rate_limited): slow down"
        );
        assert_eq!(ModelErrorKind::of(&e), Some(ModelErrorKind::RateLimited));
        assert!(matches!(&e, Error::Model { kind, .. } if kind == error_kind::RATE_LIMITED));
        assert_eq!(ModelErrorKind::of(&Error::Config("x".into())), None);
        assert_eq!(
            ModelErrorKind::parse("timeout"),
            Some(ModelErrorKind::Timeout)
        );
        assert_eq!(ModelErrorKind::parse("nope"), None);
        assert!(error_kind::is_retryable(error_kind::SERVER));
        assert!(!error_kind::is_retryable(error_kind::AUTH));
    }
}
