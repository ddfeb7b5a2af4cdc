//! Models: the provider-neutral [`ModelPort`] with its request/response types, the
//! OpenAI-compatible adapter ([`OpenAiModel`]), the offline [`ScriptedModel`], and prices.
//!
//! Inside: [`message`] (chat messages, tool specs) ← [`request`] (validation, fingerprint) and
//! [`response`] (usage, structured output, cost) ← [`tokens`] (reservation bounds) ← [`port`]
//! (the trait and [`ModelErrorKind`]) ← the adapters [`openai`] and [`scripted`]; [`prices`] is
//! the price table every cost is computed with.

pub mod message;
pub mod openai;
pub mod port;
pub mod prices;
pub mod request;
pub mod response;
pub mod scripted;
pub mod stream;
pub mod tokens;

pub use openai::{OpenAiConfig, OpenAiConfigBuilder, OpenAiModel};
pub use port::{
    DeltaSink, FinishReason, Message, ModelDelta, ModelErrorKind, ModelPort, ModelRequest,
    ModelResponse, OutputSchema, ToolCall, ToolSpec, Usage, error_kind, parse_structured,
};
pub use prices::{ModelPrice, PriceTable};
pub use scripted::{RECORDED_REQUESTS, ScriptedModel, ScriptedReply};
