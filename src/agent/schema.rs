//! A small JSON Schema validator for tool arguments.
//!
//! Supported keywords: `type` (a string or an array of strings: `object`, `array`, `string`,
//! `number`, `integer`, `boolean`, `null`), `properties`, `required`, `additionalProperties`
//! (`false` or a schema), `enum`, `const`, `items`, `minimum`, `maximum`, `exclusiveMinimum`,
//! `exclusiveMaximum`, `minLength`, `maxLength`, `minItems`, `maxItems`. Other keywords (such
//! as `description`) are ignored. Every violation is reported with its JSON pointer.

use serde_json::Value;

use crate::error::{Error, Result};

const TYPES: &[&str] = &[
    "object", "array", "string", "number", "integer", "boolean", "null",
];

/// Check that `schema` only uses keywords with the shapes this validator understands (called
/// when a tool is registered, so a broken schema is rejected before any call).
pub fn check_schema(schema: &Value) -> Result<()> {
    check_schema_at(schema, "#")
}

fn bad_schema(path: &str, message: impl std::fmt::Display) -> Error {
    Error::invalid("input schema", format!("at {path}: {message}"))
}

fn check_schema_at(schema: &Value, path: &str) -> Result<()> {
    let Some(obj) = schema.as_object() else {
        if schema.is_boolean() {
            return Ok(());
        }
        return Err(bad_schema(path, "a schema must be a JSON object"));
    };
    if let Some(t) = obj.get("type") {
        let names: Vec<&Value> = match t {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        for n in names {
            match n.as_str() {
                Some(s) if TYPES.contains(&s) => {}
                _ => {
                    return Err(bad_schema(
                        path,
                        format!("`type` {n} is not one of {}", TYPES.join(", ")),
                    ));
                }
            }
        }
    }
    if let Some(p) = obj.get("properties") {
        let Some(props) = p.as_object() else {
            return Err(bad_schema(path, "`properties` must be an object"));
        };
        for (k, s) in props {
            check_schema_at(s, &format!("{path}/properties/{k}"))?;
        }
    }
    if let Some(r) = obj.get("required")
        && !r.as_array().is_some_and(|a| a.iter().all(Value::is_string))
    {
        return Err(bad_schema(path, "`required` must be an array of strings"));
    }
    if let Some(e) = obj.get("enum")
        && !e.is_array()
    {
        return Err(bad_schema(path, "`enum` must be an array"));
    }
    if let Some(i) = obj.get("items") {
        check_schema_at(i, &format!("{path}/items"))?;
    }
    if let Some(a) = obj.get("additionalProperties") {
        check_schema_at(a, &format!("{path}/additionalProperties"))?;
    }
    for k in ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"] {
        if let Some(v) = obj.get(k)
            && !v.is_number()
        {
            return Err(bad_schema(path, format!("`{k}` must be a number")));
        }
    }
    for k in ["minLength", "maxLength", "minItems", "maxItems"] {
        if let Some(v) = obj.get(k)
            && !v.is_u64()
        {
            return Err(bad_schema(
                path,
                format!("`{k}` must be a non-negative integer"),
            ));
        }
    }
    Ok(())
}

/// Validate `value` against `schema`; returns every violation (empty when valid).
pub fn validate(schema: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    validate_at(schema, value, "", &mut errors);
    errors
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

fn ptr(path: &str) -> &str {
    if path.is_empty() { "/" } else { path }
}

fn validate_at(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let obj = match schema {
        Value::Bool(true) => return,
        Value::Bool(false) => {
            errors.push(format!("{}: no value is allowed here", ptr(path)));
            return;
        }
        Value::Object(o) => o,
        _ => return,
    };
    if let Some(t) = obj.get("type") {
        let names: Vec<&str> = match t {
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            Value::String(s) => vec![s.as_str()],
            _ => vec![],
        };
        if !names.is_empty() && !names.iter().any(|n| type_matches(n, value)) {
            errors.push(format!(
                "{}: expected {}, got {}",
                ptr(path),
                names.join(" or "),
                kind_of(value)
            ));
            return;
        }
    }
    if let Some(Value::Array(options)) = obj.get("enum")
        && !options.contains(value)
    {
        errors.push(format!(
            "{}: {value} is not one of {}",
            ptr(path),
            Value::Array(options.clone())
        ));
    }
    if let Some(c) = obj.get("const")
        && c != value
    {
        errors.push(format!("{}: must be {c}", ptr(path)));
    }
    if let Some(n) = value.as_f64() {
        let limit = |k: &str| obj.get(k).and_then(Value::as_f64);
        if let Some(m) = limit("minimum")
            && n < m
        {
            errors.push(format!("{}: {n} is less than the minimum {m}", ptr(path)));
        }
        if let Some(m) = limit("maximum")
            && n > m
        {
            errors.push(format!(
                "{}: {n} is greater than the maximum {m}",
                ptr(path)
            ));
        }
        if let Some(m) = limit("exclusiveMinimum")
            && n <= m
        {
            errors.push(format!("{}: {n} must be greater than {m}", ptr(path)));
        }
        if let Some(m) = limit("exclusiveMaximum")
            && n >= m
        {
            errors.push(format!("{}: {n} must be less than {m}", ptr(path)));
        }
    }
    let count = |k: &str| obj.get(k).and_then(Value::as_u64);
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(m) = count("minLength")
            && len < m
        {
            errors.push(format!("{}: shorter than {m} characters", ptr(path)));
        }
        if let Some(m) = count("maxLength")
            && len > m
        {
            errors.push(format!("{}: longer than {m} characters", ptr(path)));
        }
    }
    if let Some(items) = value.as_array() {
        let len = items.len() as u64;
        if let Some(m) = count("minItems")
            && len < m
        {
            errors.push(format!("{}: fewer than {m} items", ptr(path)));
        }
        if let Some(m) = count("maxItems")
            && len > m
        {
            errors.push(format!("{}: more than {m} items", ptr(path)));
        }
        if let Some(item_schema) = obj.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate_at(item_schema, item, &format!("{path}/{i}"), errors);
            }
        }
    }
    if let Some(map) = value.as_object() {
        let props = obj.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(required)) = obj.get("required") {
            for r in required.iter().filter_map(Value::as_str) {
                if !map.contains_key(r) {
                    errors.push(format!("{}: missing required property `{r}`", ptr(path)));
                }
            }
        }
        for (k, v) in map {
            let child = format!("{path}/{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate_at(s, v, &child, errors),
                None => match obj.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        errors.push(format!("{}: unexpected property `{k}`", ptr(path)));
                    }
                    Some(s @ Value::Object(_)) => validate_at(s, v, &child, errors),
                    _ => {}
                },
            }
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "amount_cents": {"type": "integer", "minimum": 1, "maximum": 100000},
                "currency": {"type": "string", "enum": ["usd", "eur"]},
                "tags": {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 2}
            },
            "required": ["amount_cents", "currency"],
            "additionalProperties": false
        })
    }

    #[test]
    fn accepts_valid_arguments() {
        check_schema(&schema()).unwrap();
        let ok = json!({"amount_cents": 500, "currency": "usd", "tags": ["a"]});
        assert!(validate(&schema(), &ok).is_empty());
    }

    #[test]
    fn reports_each_violation_with_its_path() {
        let bad = json!({"amount_cents": 0, "currency": "gbp", "tags": ["", "b", "c"], "x": 1});
        let errors = validate(&schema(), &bad);
        let text = errors.join("\n");
        assert!(
            text.contains("/amount_cents: 0 is less than the minimum 1"),
            "{text}"
        );
        assert!(text.contains("/currency: \"gbp\" is not one of"), "{text}");
        assert!(text.contains("/tags: more than 2 items"), "{text}");
        assert!(
            text.contains("/tags/0: shorter than 1 characters"),
            "{text}"
        );
        assert!(text.contains("unexpected property `x`"), "{text}");
        let missing = validate(&schema(), &json!({"amount_cents": 5}));
        assert_eq!(
            missing,
            vec!["/: missing required property `currency`".to_string()]
        );
        let wrong = validate(&schema(), &json!("hello"));
        assert_eq!(wrong, vec!["/: expected object, got string".to_string()]);
    }

    #[test]
    fn rejects_broken_schemas() {
        assert!(check_schema(&json!({"type": "strnig"})).is_err());
        assert!(check_schema(&json!({"properties": []})).is_err());
        assert!(check_schema(&json!({"required": "a"})).is_err());
        assert!(check_schema(&json!({"minLength": -1})).is_err());
        assert!(check_schema(&json!(5)).is_err());
    }
}
