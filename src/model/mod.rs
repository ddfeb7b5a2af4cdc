//! Models: the provider-neutral [`ModelPort`] with its request/response types, the
//! OpenAI-compatible adapter ([`OpenAiModel`]), the offline [`ScriptedModel`], and prices.

pub mod openai;
pub mod port;
pub mod prices;
pub mod scripted;

pub use openai::{OpenAiConfig, OpenAiConfigBuilder, OpenAiModel};
pub use port::{
    FinishReason, Message, ModelPort, ModelRequest, ModelResponse, OutputSchema, ToolCall,
    ToolSpec, Usage, error_kind, parse_structured,
};
pub use prices::{ModelPrice, PriceTable};
pub use scripted::{ScriptedModel, ScriptedReply};
