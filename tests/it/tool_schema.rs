//! Tool input schemas are enforced by a full JSON Schema validator: the keywords the old
//! hand-written validator knew, and the ones it ignored (`pattern`, `anyOf`, `oneOf`, `allOf`,
//! local `$ref`, `format`). Every case is a row: a schema, a value that passes, and a value that
//! fails with a message naming the failing path and the rule. No database needed.

use pgcrew::agent::schema::{check_schema, validate};
use pgcrew::{Error, Tool};
use serde_json::{Value, json};

struct Case {
    keyword: &'static str,
    schema: Value,
    valid: Value,
    invalid: Value,
    /// Every one must appear in the violations of `invalid`.
    expect: &'static [&'static str],
}

/// An object schema with one property `x` of schema `x`.
fn prop(x: Value) -> Value {
    json!({"type": "object", "properties": {"x": x}})
}

fn cases() -> Vec<Case> {
    vec![
        // Keywords the old validator ignored.
        Case {
            keyword: "pattern",
            schema: prop(json!({"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"})),
            valid: json!({"x": "ABC-42"}),
            invalid: json!({"x": "abc-42"}),
            expect: &["/x: \"abc-42\" does not match the pattern `^[A-Z]{3}-[0-9]+$`"],
        },
        Case {
            keyword: "anyOf",
            schema: prop(
                json!({"anyOf": [{"type": "integer"}, {"type": "string", "minLength": 2}]}),
            ),
            valid: json!({"x": "ok"}),
            invalid: json!({"x": "z"}),
            expect: &[
                "/x: matches none of the `anyOf` alternatives",
                "alternative 1: /x: expected integer, got string",
                "alternative 2: /x: shorter than 2 characters",
            ],
        },
        Case {
            keyword: "oneOf (none)",
            schema: prop(json!({"oneOf": [{"type": "integer"}, {"type": "boolean"}]})),
            valid: json!({"x": true}),
            invalid: json!({"x": "yes"}),
            expect: &["/x: matches none of the `oneOf` alternatives"],
        },
        Case {
            keyword: "oneOf (several)",
            schema: prop(json!({"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]})),
            valid: json!({"x": 0.5}),
            invalid: json!({"x": 3}),
            expect: &["/x: matches more than one of the `oneOf` alternatives"],
        },
        Case {
            keyword: "allOf",
            schema: prop(json!({"allOf": [{"type": "integer"}, {"minimum": 10}, {"maximum": 20}]})),
            valid: json!({"x": 15}),
            invalid: json!({"x": 25}),
            expect: &["/x: 25 is greater than the maximum 20"],
        },
        Case {
            keyword: "$ref (#/$defs)",
            schema: json!({
                "type": "object",
                "$defs": {"money": {"type": "object", "required": ["cents"],
                                    "properties": {"cents": {"type": "integer", "minimum": 1}}}},
                "properties": {"price": {"$ref": "#/$defs/money"}}
            }),
            valid: json!({"price": {"cents": 5}}),
            invalid: json!({"price": {"cents": 0}}),
            expect: &["/price/cents: 0 is less than the minimum 1"],
        },
        Case {
            keyword: "$ref (#/definitions)",
            schema: json!({
                "type": "object",
                "definitions": {"code": {"type": "string", "maxLength": 3}},
                "properties": {"codes": {"type": "array", "items": {"$ref": "#/definitions/code"}}}
            }),
            valid: json!({"codes": ["a", "abc"]}),
            invalid: json!({"codes": ["a", "abcd"]}),
            expect: &["/codes/1: longer than 3 characters"],
        },
        Case {
            keyword: "format: email",
            schema: prop(json!({"type": "string", "format": "email"})),
            valid: json!({"x": "ada@example.com"}),
            invalid: json!({"x": "not an address"}),
            expect: &["/x: \"not an address\" is not a valid `email` (format)"],
        },
        Case {
            keyword: "format: date-time",
            schema: prop(json!({"type": "string", "format": "date-time"})),
            valid: json!({"x": "2026-11-29T04:12:08Z"}),
            invalid: json!({"x": "2026-13-40 25:00"}),
            expect: &["/x: \"2026-13-40 25:00\" is not a valid `date-time` (format)"],
        },
        Case {
            keyword: "format: uuid",
            schema: prop(json!({"type": "string", "format": "uuid"})),
            valid: json!({"x": "67e55044-10b1-426f-9247-bb680e5fe0c8"}),
            invalid: json!({"x": "67e55044-10b1-426f"}),
            expect: &["/x: \"67e55044-10b1-426f\" is not a valid `uuid` (format)"],
        },
        // Keywords enforced before, with the same messages.
        Case {
            keyword: "type",
            schema: prop(json!({"type": ["integer", "null"]})),
            valid: json!({"x": null}),
            invalid: json!({"x": "1"}),
            expect: &["/x: expected integer or null, got string"],
        },
        Case {
            keyword: "required",
            schema: json!({"type": "object", "required": ["a", "b"]}),
            valid: json!({"a": 1, "b": 2}),
            invalid: json!({"b": 2}),
            expect: &["/: missing required property `a`"],
        },
        Case {
            keyword: "properties",
            schema: prop(json!({"type": "boolean"})),
            valid: json!({"x": false, "y": "anything"}),
            invalid: json!({"x": 0}),
            expect: &["/x: expected boolean, got number"],
        },
        Case {
            keyword: "additionalProperties: false",
            schema: json!({"type": "object", "properties": {"a": {}}, "additionalProperties": false}),
            valid: json!({"a": 1}),
            invalid: json!({"a": 1, "b": 2, "c": 3}),
            expect: &["/: unexpected property `b`", "/: unexpected property `c`"],
        },
        Case {
            keyword: "enum",
            schema: prop(json!({"enum": ["usd", "eur"]})),
            valid: json!({"x": "eur"}),
            invalid: json!({"x": "gbp"}),
            expect: &["/x: \"gbp\" is not one of [\"usd\",\"eur\"]"],
        },
        Case {
            keyword: "minimum",
            schema: prop(json!({"type": "number", "minimum": 1.5})),
            valid: json!({"x": 1.5}),
            invalid: json!({"x": 1}),
            expect: &["/x: 1 is less than the minimum 1.5"],
        },
        Case {
            keyword: "maximum",
            schema: prop(json!({"type": "integer", "maximum": 100})),
            valid: json!({"x": 100}),
            invalid: json!({"x": 101}),
            expect: &["/x: 101 is greater than the maximum 100"],
        },
        Case {
            keyword: "items",
            schema: prop(
                json!({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2}),
            ),
            valid: json!({"x": ["a"]}),
            invalid: json!({"x": ["a", 2, "c"]}),
            expect: &["/x/1: expected string, got number", "/x: more than 2 items"],
        },
        Case {
            keyword: "minItems",
            schema: prop(json!({"type": "array", "minItems": 1})),
            valid: json!({"x": [0]}),
            invalid: json!({"x": []}),
            expect: &["/x: fewer than 1 items"],
        },
        Case {
            keyword: "minLength",
            schema: prop(json!({"type": "string", "minLength": 2})),
            valid: json!({"x": "éé"}),
            invalid: json!({"x": "é"}),
            expect: &["/x: shorter than 2 characters"],
        },
        Case {
            keyword: "maxLength",
            schema: prop(json!({"type": "string", "maxLength": 2})),
            valid: json!({"x": "ab"}),
            invalid: json!({"x": "abc"}),
            expect: &["/x: longer than 2 characters"],
        },
    ]
}

#[test]
fn every_keyword_is_enforced_with_its_path_and_rule() {
    // Every case runs; the failures are listed together.
    let mut failures = Vec::new();
    for c in cases() {
        if let Err(e) = check_schema(&c.schema) {
            failures.push(format!("{}: schema rejected: {e}", c.keyword));
            continue;
        }
        let ok = validate(&c.schema, &c.valid);
        if !ok.is_empty() {
            failures.push(format!("{}: {} rejected: {ok:?}", c.keyword, c.valid));
        }
        let text = validate(&c.schema, &c.invalid).join("\n");
        for want in c.expect {
            if !text.contains(want) {
                failures.push(format!(
                    "{}: {} gave [{text}] without `{want}`",
                    c.keyword, c.invalid
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
    assert!(
        matches!(
            e,
            Error::InvalidInput {
                field: "tool arguments",
                ..
            }
        ),
        "{text}"
    );
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
        assert!(
            matches!(
                e,
                Error::InvalidInput {
                    field: "input schema",
                    ..
                }
            ),
            "{text}"
        );
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
