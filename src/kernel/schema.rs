//! JSON Schema validation of tool arguments, with the maintained [`jsonschema`] crate.
//!
//! A schema is read as JSON Schema draft 2020-12 unless its `$schema` names another draft, and
//! every keyword of that draft is enforced: `type`, `properties`, `required`,
//! `additionalProperties`, `enum`, `const`, `items`, the numeric and length limits, and also
//! `pattern`, `anyOf`, `oneOf`, `allOf`, `not`, `$ref`, `$defs`, `uniqueItems`, ... Unknown
//! keywords (such as `description`) are ignored, as the standard says.
//!
//! **Formats are asserted**: a `"format"` the crate knows (`email`, `date-time`, `date`,
//! `uuid`, `uri`, `ipv4`, ...) is a rule, not an annotation; an unknown format name is ignored.
//!
//! **No remote references**: `$ref` resolves inside the schema (`#/$defs/name`,
//! `#/definitions/name`, anchors). A `$ref` to a URL or a file is never fetched (the crate is
//! built without its network and file features, and pgcrew installs a retriever that refuses):
//! [`check_schema`] rejects such a schema with an error naming the reference.
//!
//! Every violation is reported with its JSON pointer (the instance location) and the rule.
//!
//! A [`Tool`](crate::kernel::Tool) compiles its schema once ([`CompiledSchema`]) when it is
//! built; [`validate`] compiles on every call and gives the same violations.

use std::fmt;
use std::sync::Arc;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{JsonTypeSet, Retrieve, Uri, ValidationError, Validator};
use serde_json::Value;

use crate::error::{Error, Result};

/// Refuses every reference that is not inside the schema itself: nothing is fetched.
struct NoRemoteRefs;

impl Retrieve for NoRemoteRefs {
    fn retrieve(
        &self,
        uri: &Uri<String>,
    ) -> std::result::Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!(
            "`{uri}` is not fetched: pgcrew resolves only references inside the schema (such as `#/$defs/name`); copy the definition under `$defs`"
        )
        .into())
    }
}

/// The validator for `schema`: formats asserted, no remote references.
fn compile(schema: &Value) -> std::result::Result<Validator, ValidationError<'static>> {
    jsonschema::options()
        .should_validate_formats(true)
        .with_retriever(NoRemoteRefs)
        .build(schema)
}

/// A schema checked and compiled once, kept with its validator so that every validation reuses
/// it (cheap to clone).
#[derive(Clone)]
pub struct CompiledSchema {
    schema: Value,
    validator: Arc<Validator>,
}

impl fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CompiledSchema").field(&self.schema).finish()
    }
}

impl CompiledSchema {
    /// Check and compile `schema`; the error is the one [`check_schema`] gives.
    pub fn compile(schema: Value) -> Result<Self> {
        let validator = compile(&schema).map_err(|e| bad_schema(&e))?;
        Ok(Self {
            schema,
            validator: Arc::new(validator),
        })
    }

    /// The schema as written.
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// Every violation of `value` (empty when valid), as [`validate`] reports them.
    pub fn validate(&self, value: &Value) -> Vec<String> {
        violations(&self.validator, &self.schema, value)
    }
}

/// Check that `schema` is a valid JSON Schema whose references all resolve (called when a tool
/// is registered, so a broken schema is rejected before any call).
pub fn check_schema(schema: &Value) -> Result<()> {
    compile(schema).map(drop).map_err(|e| bad_schema(&e))
}

fn bad_schema(e: &ValidationError<'_>) -> Error {
    Error::invalid("input schema", schema_error_text(e))
}

/// `at #<pointer into the schema>: <why>`.
fn schema_error_text(e: &ValidationError<'_>) -> String {
    let why = match e.kind() {
        ValidationErrorKind::Referencing(r) => format!("cannot resolve a `$ref`: {r}"),
        _ => format!("not a valid JSON Schema (`{}`): {e}", e.kind().keyword()),
    };
    format!("at #{}: {why}", e.instance_path())
}

/// Validate `value` against `schema`; returns every violation (empty when valid). A schema that
/// [`check_schema`] rejects gives one violation saying why.
pub fn validate(schema: &Value, value: &Value) -> Vec<String> {
    match compile(schema) {
        Ok(validator) => violations(&validator, schema, value),
        Err(e) => vec![format!(
            "/: the input schema is invalid: {}",
            schema_error_text(&e)
        )],
    }
}

/// The violations `validator` (compiled from `schema`) finds in `value`.
fn violations(validator: &Validator, schema: &Value, value: &Value) -> Vec<String> {
    validator
        .iter_errors(value)
        .flat_map(|e| describe(schema, &e))
        .collect()
}

fn ptr(path: &str) -> &str {
    if path.is_empty() { "/" } else { path }
}

/// A number as the messages show it (`0`, `1.5`).
fn num(v: &Value) -> String {
    v.as_f64().map_or_else(|| v.to_string(), |n| n.to_string())
}

/// The types a failed `type` asked for, in the schema's own order when the keyword can be
/// found at the error's schema path (the crate's type set has an order of its own).
fn type_names(schema: &Value, e: &ValidationError<'_>, kind: &TypeKind) -> String {
    let names = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a
            .iter()
            .map(|n| n.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .map(|n| n.join(" or ")),
        _ => None,
    };
    if let Some(written) = schema.pointer(e.schema_path().as_str()).and_then(names) {
        return written;
    }
    match kind {
        TypeKind::Single(t) => t.to_string(),
        TypeKind::Multiple(set) => names_of(*set),
    }
}

fn names_of(set: JsonTypeSet) -> String {
    set.iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// The alternatives of an `anyOf` / `oneOf` and why each failed.
fn alternatives(schema: &Value, context: &[Vec<ValidationError<'static>>]) -> String {
    context
        .iter()
        .enumerate()
        .map(|(i, errors)| {
            let why: Vec<String> = errors.iter().flat_map(|e| describe(schema, e)).collect();
            format!("alternative {}: {}", i + 1, why.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// One violation of `schema` as `<pointer>: <what is wrong>` lines (one per unexpected
/// property).
fn describe(schema: &Value, e: &ValidationError<'_>) -> Vec<String> {
    use ValidationErrorKind as K;
    let at = ptr(e.instance_path().as_str());
    let value = e.instance();
    let text = match e.kind() {
        K::Type { kind } => format!(
            "{at}: expected {}, got {}",
            type_names(schema, e, kind),
            kind_of(value)
        ),
        K::Enum { options } => format!("{at}: {value} is not one of {options}"),
        K::Constant { expected_value } => format!("{at}: must be {expected_value}"),
        K::Minimum { limit } => format!(
            "{at}: {} is less than the minimum {}",
            num(value),
            num(limit)
        ),
        K::Maximum { limit } => format!(
            "{at}: {} is greater than the maximum {}",
            num(value),
            num(limit)
        ),
        K::ExclusiveMinimum { limit } => {
            format!("{at}: {} must be greater than {}", num(value), num(limit))
        }
        K::ExclusiveMaximum { limit } => {
            format!("{at}: {} must be less than {}", num(value), num(limit))
        }
        K::MinLength { limit } => format!("{at}: shorter than {limit} characters"),
        K::MaxLength { limit } => format!("{at}: longer than {limit} characters"),
        K::MinItems { limit } => format!("{at}: fewer than {limit} items"),
        K::MaxItems { limit } => format!("{at}: more than {limit} items"),
        K::Required { property } => format!(
            "{at}: missing required property `{}`",
            property
                .as_str()
                .map_or_else(|| property.to_string(), str::to_string)
        ),
        K::AdditionalProperties { unexpected } => {
            return unexpected
                .iter()
                .map(|k| format!("{at}: unexpected property `{k}`"))
                .collect();
        }
        K::FalseSchema => format!("{at}: no value is allowed here"),
        K::Pattern { pattern } => format!("{at}: {value} does not match the pattern `{pattern}`"),
        K::Format { format } => format!("{at}: {value} is not a valid `{format}` (format)"),
        K::AnyOf { context } => format!(
            "{at}: matches none of the `anyOf` alternatives ({})",
            alternatives(schema, context)
        ),
        K::OneOfNotValid { context } => format!(
            "{at}: matches none of the `oneOf` alternatives ({})",
            alternatives(schema, context)
        ),
        K::OneOfMultipleValid { .. } => {
            format!("{at}: matches more than one of the `oneOf` alternatives")
        }
        K::Referencing(r) => format!("{at}: cannot resolve a `$ref`: {r}"),
        other => format!("{at}: {e} (`{}`)", other.keyword()),
    };
    vec![text]
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
    fn a_compiled_schema_reports_what_validate_reports() {
        let compiled = CompiledSchema::compile(schema()).unwrap();
        assert_eq!(compiled.schema(), &schema());
        for value in [
            json!({"amount_cents": 500, "currency": "usd"}),
            json!({"amount_cents": 0, "currency": "gbp", "tags": ["", "b", "c"], "x": 1}),
            json!("hello"),
        ] {
            assert_eq!(compiled.validate(&value), validate(&schema(), &value));
        }
        let broken = json!({"type": "strnig"});
        let (a, b) = (
            CompiledSchema::compile(broken.clone()),
            check_schema(&broken),
        );
        assert_eq!(
            a.map(drop).map_err(|e| e.to_string()),
            b.map_err(|e| e.to_string())
        );
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
