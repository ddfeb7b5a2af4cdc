//! Streaming chat completions: the request goes out with `stream: true` and
//! `stream_options.include_usage`, async-openai parses the server-sent chunks, and
//! [`Accumulator`] builds the same [`ModelResponse`] a non-streaming call returns while each
//! piece of text is handed to the caller's sink. A stream that ends (or breaks) before a
//! finish reason arrived is [`ModelErrorKind::StreamCut`].

use std::collections::BTreeMap;

use async_openai::types::chat::{
    CreateChatCompletionStreamResponse, FinishReason as OaiFinishReason,
};
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::wire::{assemble, finish_reason, parse_arguments};
use super::{OpenAiModel, classify};
use crate::error::Result;
use crate::model::port::{
    DeltaSink, ModelDelta, ModelErrorKind, ModelRequest, ModelResponse, ToolCall, model_error,
};

/// The chat completions body of a streaming call.
pub(super) fn stream_body(mut body: Value) -> Value {
    if let Value::Object(map) = &mut body {
        map.insert("stream".into(), Value::Bool(true));
        map.insert("stream_options".into(), json!({"include_usage": true}));
    }
    body
}

/// The answer as its chunks arrive (choice 0 only; pgcrew asks for one).
#[derive(Debug, Default)]
struct Accumulator {
    content: Option<String>,
    refusal: Option<String>,
    /// Tool calls by index: id, name, argument text.
    calls: BTreeMap<u32, (String, String, String)>,
    finish: Option<OaiFinishReason>,
    usage: Option<(u32, u32)>,
    model: String,
    chars: usize,
}

impl Accumulator {
    /// Take one chunk in; the text it adds, if any.
    fn add(&mut self, chunk: CreateChatCompletionStreamResponse) -> Option<String> {
        if let Some(u) = chunk.usage {
            self.usage = Some((u.prompt_tokens, u.completion_tokens));
        }
        if self.model.is_empty() {
            self.model = chunk.model;
        }
        let mut text = String::new();
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            let delta = choice.delta;
            if let Some(c) = delta.content {
                text.push_str(&c);
                self.content.get_or_insert_with(String::new).push_str(&c);
            }
            if let Some(r) = delta.refusal {
                self.refusal.get_or_insert_with(String::new).push_str(&r);
            }
            for call in delta.tool_calls.unwrap_or_default() {
                let entry = self.calls.entry(call.index).or_default();
                if let Some(id) = call.id {
                    entry.0 = id;
                }
                if let Some(f) = call.function {
                    entry.1.push_str(f.name.as_deref().unwrap_or_default());
                    entry.2.push_str(f.arguments.as_deref().unwrap_or_default());
                }
            }
            if choice.finish_reason.is_some() {
                self.finish = choice.finish_reason;
            }
        }
        self.chars += text.chars().count();
        (!text.is_empty()).then_some(text)
    }

    /// The response, or [`ModelErrorKind::StreamCut`] when no finish reason arrived.
    fn finish(self, request: &ModelRequest, base_url: &str) -> Result<ModelResponse> {
        let Some(reason) = self.finish else {
            return Err(model_error(
                ModelErrorKind::StreamCut,
                format!(
                    "the stream from {base_url} ended before the answer finished (no finish_reason; {} characters received)",
                    self.chars
                ),
            ));
        };
        let tool_calls = self
            .calls
            .into_values()
            .map(|(id, name, args)| {
                let arguments = parse_arguments(&name, &args)?;
                Ok(ToolCall {
                    id,
                    name,
                    arguments,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let finish = finish_reason(Some(reason), !tool_calls.is_empty());
        let content = self.content.or(self.refusal);
        Ok(assemble(
            request, content, tool_calls, finish, self.usage, self.model,
        ))
    }
}

impl OpenAiModel {
    /// One streaming attempt: open the stream (each chunk, and the response, must arrive within
    /// the timeout), hand each piece of text to `sink`, and build the response.
    pub(super) async fn stream_attempt(
        &self,
        request: &ModelRequest,
        body: &Value,
        sink: &DeltaSink,
    ) -> Result<ModelResponse> {
        let chat = self.client.chat();
        let open = chat.create_stream_byot::<&Value, CreateChatCompletionStreamResponse>(body);
        let mut stream = match tokio::time::timeout(self.config.timeout, open).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(classify(e, &self.config)),
            Err(_) => return Err(self.timed_out("no response")),
        };
        let mut acc = Accumulator::default();
        loop {
            match tokio::time::timeout(self.config.timeout, stream.next()).await {
                Err(_) => return Err(self.timed_out("no further chunk")),
                Ok(None) => break,
                Ok(Some(Ok(chunk))) => {
                    if let Some(text) = acc.add(chunk) {
                        sink(ModelDelta::text(text));
                    }
                }
                Ok(Some(Err(async_openai::error::OpenAIError::StreamError(e)))) => {
                    return Err(model_error(
                        ModelErrorKind::StreamCut,
                        format!(
                            "the stream from {} broke off after {} characters: {e}",
                            self.config.base_url, acc.chars
                        ),
                    ));
                }
                Ok(Some(Err(e))) => return Err(classify(e, &self.config)),
            }
        }
        acc.finish(request, &self.config.base_url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(v: Value) -> CreateChatCompletionStreamResponse {
        serde_json::from_value(v).unwrap()
    }

    fn base(choices: Value, usage: Value) -> Value {
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": choices, "usage": usage})
    }

    #[test]
    fn chunks_add_up_to_text_tool_calls_and_usage() {
        let req = ModelRequest::new("m").user("hi");
        let mut acc = Accumulator::default();
        let t = acc.add(chunk(base(
            json!([{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]),
            Value::Null,
        )));
        assert_eq!(t.as_deref(), Some("Hel"));
        acc.add(chunk(base(
            json!([{"index": 0, "delta": {"content": "lo", "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": "look", "arguments": "{\"q\":"}}]}}]),
            Value::Null,
        )));
        acc.add(chunk(base(
            json!([{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": "1}"}}]},
                "finish_reason": "tool_calls"}]),
            Value::Null,
        )));
        acc.add(chunk(base(
            json!([]),
            json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}),
        )));
        let r = acc.finish(&req, "http://x").unwrap();
        assert_eq!(r.content.as_deref(), Some("Hello"));
        assert_eq!(
            r.tool_calls,
            vec![ToolCall::new("call_1", "look", json!({"q": 1}))]
        );
        assert_eq!(r.usage.prompt_tokens, 7);
        assert_eq!(r.usage.completion_tokens, 3);
        assert!(!r.usage.estimated);
    }

    #[test]
    fn a_stream_without_a_finish_reason_was_cut() {
        let req = ModelRequest::new("m").user("hi");
        let mut acc = Accumulator::default();
        acc.add(chunk(base(
            json!([{"index": 0, "delta": {"content": "Hel"}}]),
            Value::Null,
        )));
        let e = acc.finish(&req, "http://x").unwrap_err();
        assert_eq!(ModelErrorKind::of(&e), Some(ModelErrorKind::StreamCut));
        assert!(e.to_string().contains("3 characters"), "{e}");
    }
}
