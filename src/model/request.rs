//! The provider-neutral request ([`ModelRequest`]): building, validation, the canonical JSON
//! and fingerprint a replay is checked with, and prompt-token bounds a reservation is priced
//! with.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::message::{Message, OutputSchema, ToolSpec};
use crate::error::{Error, Result};

/// A provider-neutral chat completion request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRequest {
    /// The model name (`gpt-4o-mini`, `llama3.1`, ...).
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
    /// Maximum completion tokens (`None` = provider default). The kernel reserves budget for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Structured output: the answer must be JSON matching this schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<OutputSchema>,
    /// Free-form extra options passed through to the provider (`top_p`, `seed`, `stop`, or a
    /// server-specific option such as vLLM's `top_k`). They may not override the fields above.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
    /// The step may be skipped: a tenant whose degradation policy has a `skip_optional` rule
    /// active at its budget status gets no model call for it (the kernel records
    /// `budget_degraded` and returns a [`ModelStep`](crate::kernel::ModelStep) with `skipped`
    /// set). Default `false`. Not sent to the provider and not part of the fingerprint (marking a
    /// step optional does not change what is asked of the model).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

/// Options an adapter sets itself; `extra` may not contain them.
const RESERVED_OPTIONS: &[&str] = &[
    "model",
    "messages",
    "tools",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "response_format",
    "stream",
];

fn validate_name(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 {
        return Err(Error::invalid(
            field,
            format!("`{name}` must be 1 to 64 characters long"),
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::invalid(
            field,
            format!("`{name}` may only contain ASCII letters, digits, `_` and `-`"),
        ));
    }
    Ok(())
}

fn validate_object_schema(field: &'static str, owner: &str, schema: &Value) -> Result<()> {
    let Some(obj) = schema.as_object() else {
        return Err(Error::invalid(
            field,
            format!("the JSON schema of `{owner}` must be a JSON object, got {schema}"),
        ));
    };
    if let Some(t) = obj.get("type")
        && t != "object"
    {
        return Err(Error::invalid(
            field,
            format!(
                "the JSON schema of `{owner}` must describe an object (\"type\": \"object\"), got type {t}"
            ),
        ));
    }
    Ok(())
}

impl ModelRequest {
    /// A request for `model` with no messages yet.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            messages: Vec::new(),
            tools: Vec::new(),
            max_tokens: None,
            temperature: None,
            output_schema: None,
            extra: Map::new(),
            optional: false,
        }
    }

    /// Append a message.
    pub fn message(mut self, message: Message) -> Self {
        self.messages.push(message);
        self
    }

    /// Append a system message.
    pub fn system(self, content: impl Into<String>) -> Self {
        self.message(Message::system(content))
    }

    /// Append a user message.
    pub fn user(self, content: impl Into<String>) -> Self {
        self.message(Message::user(content))
    }

    /// Offer a tool.
    pub fn tool(mut self, tool: ToolSpec) -> Self {
        self.tools.push(tool);
        self
    }

    /// Set the maximum completion tokens.
    pub fn max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// Set the temperature.
    pub fn temperature(mut self, temperature: f64) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Ask for structured output matching `schema`.
    pub fn output_schema(mut self, name: impl Into<String>, schema: Value) -> Self {
        self.output_schema = Some(OutputSchema {
            name: name.into(),
            schema,
            strict: false,
        });
        self
    }

    /// Ask for structured output matching `schema`, with strict adherence (see
    /// [`OutputSchema::strict`]).
    pub fn output_schema_strict(mut self, name: impl Into<String>, schema: Value) -> Self {
        self.output_schema = Some(OutputSchema {
            name: name.into(),
            schema,
            strict: true,
        });
        self
    }

    /// Mark the step optional (the `optional` field): a tenant's `skip_optional` degradation
    /// rule may skip it.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    /// Set a free-form extra option.
    pub fn extra(mut self, key: impl Into<String>, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }

    /// Check the request before sending it: a model name, at least one message, tool ids that
    /// answer earlier calls, valid tool and schema names, object schemas, a temperature in
    /// [0, 2], a positive `max_tokens`, unique tool names, no reserved key in `extra`.
    pub fn validate(&self) -> Result<()> {
        crate::ids::validate_text_id("model", &self.model)?;
        if self.messages.is_empty() {
            return Err(Error::invalid(
                "messages",
                "a model request needs at least one message (add one with .user(..))",
            ));
        }
        let mut call_ids = std::collections::BTreeSet::new();
        for (i, m) in self.messages.iter().enumerate() {
            match m {
                Message::Assistant {
                    content,
                    tool_calls,
                } => {
                    if content.is_none() && tool_calls.is_empty() {
                        return Err(Error::invalid(
                            "messages",
                            format!("message {i} (assistant) has neither content nor tool calls"),
                        ));
                    }
                    for c in tool_calls {
                        call_ids.insert(c.id.as_str());
                    }
                }
                Message::Tool { tool_call_id, .. } => {
                    if !call_ids.contains(tool_call_id.as_str()) {
                        return Err(Error::invalid(
                            "messages",
                            format!(
                                "message {i} is a tool result for call `{tool_call_id}`, but no earlier assistant message made that call"
                            ),
                        ));
                    }
                }
                Message::System { .. } | Message::User { .. } => {}
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for t in &self.tools {
            validate_name("tool name", &t.name)?;
            if !names.insert(t.name.as_str()) {
                return Err(Error::invalid(
                    "tools",
                    format!("tool `{}` is listed twice", t.name),
                ));
            }
            validate_object_schema("tool parameters", &t.name, &t.parameters)?;
        }
        if let Some(s) = &self.output_schema {
            validate_name("output schema name", &s.name)?;
            validate_object_schema("output schema", &s.name, &s.schema)?;
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            return Err(Error::invalid(
                "temperature",
                format!("{t} is outside the accepted range 0 to 2"),
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(Error::invalid(
                "max_tokens",
                "must be at least 1 (leave it unset for the provider default)",
            ));
        }
        for key in self.extra.keys() {
            if RESERVED_OPTIONS.contains(&key.as_str()) {
                return Err(Error::invalid(
                    "extra",
                    format!(
                        "option `{key}` cannot be set through `extra`: use the request field instead"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The canonical JSON this request is fingerprinted from: model, messages, options
    /// (`max_tokens`, `temperature`, `extra`), tools and output schema, with object keys sorted.
    pub fn canonical_json(&self) -> Result<String> {
        let value = serde_json::json!({
            "v": 1,
            "model": self.model,
            "messages": self.messages,
            "options": {
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                "extra": self.extra,
            },
            "tools": self.tools,
            "output_schema": self.output_schema,
        });
        Ok(serde_json::to_string(&canonicalize(value))?)
    }

    /// Hex SHA-256 of [`canonical_json`](Self::canonical_json): logically equal requests have
    /// equal fingerprints; any change to the prompt, the model, an option, the tools or the
    /// output schema changes it.
    pub fn fingerprint(&self) -> Result<String> {
        Ok(hex::encode(Sha256::digest(
            self.canonical_json()?.as_bytes(),
        )))
    }

    /// The text of the last user message, if any.
    pub fn last_user_text(&self) -> Option<&str> {
        self.messages.iter().rev().find_map(|m| match m {
            Message::User { content } => Some(content.as_str()),
            _ => None,
        })
    }
}

/// Rebuild `value` with every object's keys inserted in sorted order (canonical regardless of
/// serde_json's map implementation).
fn canonicalize(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, canonicalize(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonicalize).collect()),
        other => other,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A request using every part (shared with the token-bound tests).
    pub(crate) fn base() -> ModelRequest {
        ModelRequest::new("gpt-4o-mini")
            .system("be brief")
            .user("what is 2+2?")
            .max_tokens(100)
            .temperature(0.2)
            .tool(ToolSpec::new(
                "calc",
                "evaluates arithmetic",
                json!({"type": "object", "properties": {"expr": {"type": "string"}}}),
            ))
            .output_schema(
                "answer",
                json!({"type": "object", "properties": {"n": {"type": "integer"}}}),
            )
            .extra("top_p", json!(0.9))
    }

    #[test]
    fn fingerprint_is_stable_and_hex() {
        let a = base().fingerprint().unwrap();
        assert_eq!(a, base().fingerprint().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        // Round trip through serde (as when read back from the ledger) keeps it.
        let stored = serde_json::to_string(&base()).unwrap();
        let back: ModelRequest = serde_json::from_str(&stored).unwrap();
        assert_eq!(back.fingerprint().unwrap(), a);
    }

    #[test]
    fn fingerprint_ignores_key_order_in_schemas() {
        let mut r1 = base();
        r1.tools[0].parameters = serde_json::from_str(
            r#"{"type":"object","properties":{"a":{"type":"string"},"b":{"type":"integer"}}}"#,
        )
        .unwrap();
        let mut r2 = base();
        r2.tools[0].parameters = serde_json::from_str(
            r#"{"properties":{"b":{"type":"integer"},"a":{"type":"string"}},"type":"object"}"#,
        )
        .unwrap();
        assert_eq!(r1.fingerprint().unwrap(), r2.fingerprint().unwrap());
    }

    #[test]
    fn fingerprint_changes_with_each_part() {
        let f = base().fingerprint().unwrap();
        let mut prompt = base();
        prompt.messages[1] = Message::user("what is 2+3?");
        let mut model = base();
        model.model = "gpt-4o".into();
        let max_tokens = base().max_tokens(101);
        let temperature = base().temperature(0.3);
        let extra = base().extra("seed", json!(7));
        let mut tools = base();
        tools.tools.clear();
        let mut tool_desc = base();
        tool_desc.tools[0].description = "does arithmetic".into();
        let mut schema = base();
        schema.output_schema = None;
        let schema2 = base().output_schema(
            "answer",
            json!({"type": "object", "properties": {"n": {"type": "number"}}}),
        );
        let system = {
            let mut r = base();
            r.messages[0] = Message::system("be verbose");
            r
        };
        let mut seen = std::collections::BTreeSet::new();
        seen.insert(f.clone());
        for (what, r) in [
            ("prompt", prompt),
            ("model", model),
            ("max_tokens", max_tokens),
            ("temperature", temperature),
            ("extra", extra),
            ("tool list", tools),
            ("tool description", tool_desc),
            ("schema removed", schema),
            ("schema changed", schema2),
            ("system", system),
        ] {
            let g = r.fingerprint().unwrap();
            assert_ne!(g, f, "changing the {what} must change the fingerprint");
            assert!(seen.insert(g), "{what} collided with another variant");
        }
    }

    #[test]
    fn validate_rejects_bad_requests() {
        assert!(base().validate().is_ok());
        let cases: Vec<(ModelRequest, &str)> = vec![
            (ModelRequest::new("m"), "messages"),
            (ModelRequest::new("").user("x"), "model"),
            (base().temperature(3.0), "temperature"),
            (base().max_tokens(0), "max_tokens"),
            (base().extra("model", json!("x")), "extra"),
            (base().tool(base().tools[0].clone()), "tools"),
            (
                base().tool(ToolSpec::new("bad name", "", json!({"type": "object"}))),
                "tool name",
            ),
            (
                base().tool(ToolSpec::new("t2", "", json!("not a schema"))),
                "tool parameters",
            ),
            (
                base().message(Message::tool_result("nope", "{}")),
                "messages",
            ),
        ];
        for (r, field) in cases {
            match r.validate() {
                Err(Error::InvalidInput { field: f, message }) => {
                    assert_eq!(f, field, "{message}")
                }
                other => panic!("expected InvalidInput({field}), got {other:?}"),
            }
        }
    }
}
