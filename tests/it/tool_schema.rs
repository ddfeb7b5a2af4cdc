//! Tool input schemas are enforced by a full JSON Schema validator: the keywords the old
//! hand-written validator knew, and the ones it ignored (`pattern`, `anyOf`, `oneOf`, `allOf`,
//! local `$ref`, `format`). Every case is a row: a schema, a value that passes, and a value that
//! fails with a message naming the failing path and the rule. No database needed.

use pgcrew::Tool;
use pgcrew::agent::schema::{check_schema, validate};
use serde_json::{Value, json};

use crate::common::assert_invalid_input;

/// The table: one row per keyword, the ones the old validator ignored first. A row is
/// `{"keyword", "schema" (or "x": the schema of property `x` of an object), "valid",
/// "invalid", "expect": [texts every one of which the violations of "invalid" contain]}`.
const CASES: &str = include_str!("tool_schema_cases.json");

#[test]
fn every_keyword_is_enforced_with_its_path_and_rule() {
    let cases: Vec<Value> = serde_json::from_str(CASES).unwrap();
    assert_eq!(cases.len(), 21);
    // Every case runs; the failures are listed together.
    let mut failures = Vec::new();
    for c in &cases {
        let keyword = &c["keyword"];
        let schema = match c.get("x") {
            Some(x) => json!({"type": "object", "properties": {"x": x}}),
            None => c["schema"].clone(),
        };
        if let Err(e) = check_schema(&schema) {
            failures.push(format!("{keyword}: schema rejected: {e}"));
            continue;
        }
        let ok = validate(&schema, &c["valid"]);
        if !ok.is_empty() {
            failures.push(format!("{keyword}: {} rejected: {ok:?}", c["valid"]));
        }
        let text = validate(&schema, &c["invalid"]).join("\n");
        for want in c["expect"].as_array().unwrap() {
            let want = want.as_str().unwrap();
            if !text.contains(want) {
                failures.push(format!(
                    "{keyword}: {} gave [{text}] without `{want}`",
                    c["invalid"]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_tool_rejects_arguments_naming_the_tool_path_and_rule() {
    let tool = Tool::builder("book_meeting")
        .input_schema(json!({
            "type": "object",
            "properties": {
                "attendee": {"type": "string", "format": "email"},
                "at": {"type": "string", "format": "date-time"},
                "room": {"type": "string", "pattern": "^R[0-9]{3}$"}
            },
            "required": ["attendee", "at"],
            "additionalProperties": false
        }))
        .handler(|_ctx, args| async move { Ok(args) })
        .build()
        .unwrap();
    tool.validate_arguments(&json!({"attendee": "a@b.example", "at": "2026-01-02T03:04:05Z"}))
        .unwrap();
    let e = tool
        .validate_arguments(
            &json!({"attendee": "nobody", "at": "2026-01-02T03:04:05Z", "room": "B12"}),
        )
        .unwrap_err();
    let text = e.to_string();
    assert_invalid_input(&e, "tool arguments");
    assert!(
        text.contains("arguments for tool `book_meeting` do not match its input schema"),
        "{text}"
    );
    assert!(
        text.contains("/attendee: \"nobody\" is not a valid `email` (format)"),
        "{text}"
    );
    assert!(
        text.contains("/room: \"B12\" does not match the pattern `^R[0-9]{3}$`"),
        "{text}"
    );
}

/// A tool whose input schema is `schema`, or the error of building it.
fn build_tool(schema: Value) -> pgcrew::Result<Tool> {
    Tool::builder("t")
        .input_schema(schema)
        .handler(|_ctx, args| async move { Ok(args) })
        .build()
}

#[test]
fn invalid_schemas_are_rejected_when_the_tool_is_built() {
    let cases: &[(Value, &str)] = &[
        (
            json!({"type": "object", "properties": {"a": {"type": "strnig"}}}),
            "at #/properties/a/type",
        ),
        (
            json!({"type": "object", "properties": {"a": {"pattern": "(unclosed"}}}),
            "at #/properties/a/pattern",
        ),
        (json!({"type": "object", "required": "a"}), "at #/required"),
        (
            json!({"type": "object", "properties": {"a": {"minLength": -1}}}),
            "at #/properties/a/minLength",
        ),
        (json!({"type": "object", "anyOf": {}}), "at #/anyOf"),
        (
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
            "$ref",
        ),
    ];
    for (schema, want) in cases {
        let e = build_tool(schema.clone()).expect_err("an invalid schema was accepted");
        let text = e.to_string();
        assert_invalid_input(&e, "input schema");
        assert!(text.contains(want), "{schema}: {text} lacks `{want}`");
        assert!(check_schema(schema).is_err(), "{schema}");
    }
}

#[test]
fn remote_references_are_refused_without_fetching() {
    // A port nothing listens on and a file that does not exist: the error must come from the
    // refusal, not from a connection attempt or a file read.
    for uri in [
        "http://127.0.0.1:9/schema.json",
        "https://schemas.example.invalid/money.json#/$defs/money",
        "file:///nonexistent/schema.json",
    ] {
        let schema = json!({"type": "object", "properties": {"a": {"$ref": uri}}});
        let text = build_tool(schema.clone())
            .expect_err("a remote $ref was accepted")
            .to_string();
        assert!(text.contains("is not fetched"), "{uri}: {text}");
        assert!(text.contains("#/$defs/name"), "{uri}: {text}");
        let errors = validate(&schema, &json!({"a": 1}));
        assert!(
            errors.len() == 1 && errors[0].contains("the input schema is invalid"),
            "{uri}: {errors:?}"
        );
    }
}
