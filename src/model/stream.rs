//! Streaming model output: what a streaming [`ModelPort::stream`](super::ModelPort::stream)
//! call hands out while the model is still answering ([`ModelDelta`]), and the sink it hands
//! them to ([`DeltaSink`]).
//!
//! Deltas are a live view only: the call's result is the same [`ModelResponse`](super::ModelResponse)
//! a non-streaming call returns, and the kernel records that (and only that) in the ledger, so
//! replay never depends on what was streamed.

/// One piece of streamed output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ModelDelta {
    /// More answer text, in order.
    Text {
        /// The text added.
        text: String,
    },
    /// The call is being retried (say, after the stream was cut): the text streamed so far is
    /// void and the answer starts again.
    Retry {
        /// The attempt that starts now (1 for the first retry).
        attempt: u32,
        /// Why.
        reason: String,
    },
}

impl ModelDelta {
    /// A [`ModelDelta::Text`].
    pub fn text(text: impl Into<String>) -> Self {
        ModelDelta::Text { text: text.into() }
    }
}

/// Where a streaming call hands its deltas, in order, as they arrive. It must not block (the
/// kernel's sink only queues them).
pub type DeltaSink = dyn Fn(ModelDelta) + Send + Sync;
