//! The wire format: a [`ModelRequest`] as a chat completions body, and a chat completion as a
//! [`ModelResponse`].

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
use serde_json::Value;

use crate::error::Result;
use crate::model::port::{
    FinishReason, Message, ModelErrorKind, ModelRequest, ModelResponse, ToolCall, Usage,
    completion_token_bound, model_error, prompt_token_bound, truncate,
};

/// The chat completions body for `request` (typed through async-openai, then merged with the
/// request's free-form `extra` options).
pub(super) fn request_body(request: &ModelRequest, max_completion_tokens: bool) -> Result<Value> {
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

pub(super) fn from_oai_response(
    request: &ModelRequest,
    resp: CreateChatCompletionResponse,
) -> Result<ModelResponse> {
    let Some(choice) = resp.choices.into_iter().next() else {
        return Err(model_error(
            ModelErrorKind::InvalidResponse,
            "the provider returned a chat completion with no choices",
        ));
    };
    let msg = choice.message;
    let mut tool_calls = Vec::new();
    for call in msg.tool_calls.unwrap_or_default() {
        match call {
            ChatCompletionMessageToolCalls::Function(f) => {
                let arguments = parse_arguments(&f.function.name, &f.function.arguments)?;
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
    let finish_reason = finish_reason(choice.finish_reason, !tool_calls.is_empty());
    let usage = resp.usage.map(|u| (u.prompt_tokens, u.completion_tokens));
    Ok(assemble(
        request,
        content,
        tool_calls,
        finish_reason,
        usage,
        resp.model,
    ))
}

/// Tool-call arguments as JSON (an empty string is `{}`); text that is not JSON is an
/// [`ModelErrorKind::InvalidOutput`] error naming the tool.
pub(super) fn parse_arguments(tool: &str, raw: &str) -> Result<Value> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_str(raw).map_err(|e| {
        model_error(
            ModelErrorKind::InvalidOutput,
            format!(
                "the model called tool `{tool}` with arguments that are not valid JSON ({e}): {}",
                truncate(raw, 300)
            ),
        )
    })
}

/// pgcrew's finish reason for the provider's (`None`: tool calls when there are some).
pub(super) fn finish_reason(reason: Option<OaiFinishReason>, has_calls: bool) -> FinishReason {
    match reason {
        Some(OaiFinishReason::Stop) => FinishReason::Stop,
        Some(OaiFinishReason::Length) => FinishReason::Length,
        Some(OaiFinishReason::ToolCalls) | Some(OaiFinishReason::FunctionCall) => {
            FinishReason::ToolCalls
        }
        Some(OaiFinishReason::ContentFilter) => FinishReason::ContentFilter,
        None if has_calls => FinishReason::ToolCalls,
        None => FinishReason::Other,
    }
}

/// The response from its parts; `usage` is `(prompt, completion)` tokens as reported, and
/// without it the conservative bounds are charged (never less than was really used, never
/// more than was reserved for).
pub(super) fn assemble(
    request: &ModelRequest,
    content: Option<String>,
    tool_calls: Vec<ToolCall>,
    finish_reason: FinishReason,
    usage: Option<(u32, u32)>,
    model: String,
) -> ModelResponse {
    let usage = match usage {
        Some((p, c)) => Usage::new(u64::from(p), u64::from(c)),
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
    ModelResponse {
        content,
        tool_calls,
        usage,
        finish_reason,
        model: if model.is_empty() {
            request.model.clone()
        } else {
            model
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::port::ToolSpec;
    use serde_json::json;

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
}
