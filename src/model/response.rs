//! The provider-neutral response ([`ModelResponse`]): usage, finish reason, structured output
//! parsing and cost.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::message::ToolCall;
use super::port::{ModelErrorKind, model_error, truncate};
use crate::error::Result;
use crate::model::PriceTable;

/// Token usage of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// True when the provider reported no usage and pgcrew estimated it. The OpenAI adapter
    /// then charges the conservative bounds ([`prompt_token_bound`](super::tokens::prompt_token_bound), [`completion_token_bound`](super::tokens::completion_token_bound));
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

    /// The cost of this call in USD under `prices` ([`Error::UnknownModelPrice`](crate::Error::UnknownModelPrice) when the
    /// model has no price).
    pub fn cost(&self, prices: &PriceTable) -> Result<f64> {
        prices.cost(
            &self.model,
            self.usage.prompt_tokens,
            self.usage.completion_tokens,
        )
    }

    /// Parse the structured output (the text content) into `T`. A missing answer, invalid
    /// JSON or JSON that does not match `T` is an [`Error::Model`](crate::Error::Model) of kind `invalid_output`. A
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
            ModelErrorKind::InvalidOutput,
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
            ModelErrorKind::InvalidOutput,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use serde::Deserialize;

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
