//! The bodies of the fuzz targets for every parser of external input, shared by the cargo-fuzz
//! targets in `fuzz_targets/` and by the stable smoke test `tests/it/fuzz_smoke.rs` (which
//! includes this file). Each function must never panic, whatever the input; where a parse
//! succeeds it checks a round-trip invariant.

#![allow(missing_docs)]

use pgcrew::coord::notify::{CHANNELS, Event};
use pgcrew::queue::{MAX_PAYLOAD_BYTES, NewTask, payload_size};
use pgcrew::{RunId, TaskId, TenantId};
use serde_json::{Value, json};

/// CLI durations (`--task-time 5ms`, `--delay 30s`, ...).
pub fn parse_duration(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match pgcrew::config::parse_duration(s) {
        Ok(d) => {
            // Whole milliseconds print and parse back to the same duration.
            if d.subsec_nanos() % 1_000_000 == 0 && d.as_millis() < u128::from(u32::MAX) {
                let again = pgcrew::config::parse_duration(&format!("{}ms", d.as_millis()));
                assert_eq!(again.ok(), Some(d), "{s:?}");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// NOTIFY payloads on every channel pgcrew listens to (and an unknown one).
pub fn event_parse(data: &[u8]) {
    let payload = String::from_utf8_lossy(data);
    for channel in CHANNELS.iter().copied().chain(["not_a_channel"]) {
        if let Some(ev) = Event::parse(channel, &payload) {
            // A parsed event belongs to the channel it came on.
            assert_ne!(channel, "not_a_channel");
            let _ = ev.kind();
            let _ = ev.run_id();
        }
    }
}

/// Ids from the command line and from payloads.
pub fn ids(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    if let Ok(id) = s.parse::<RunId>() {
        assert_eq!(id.to_string().parse::<RunId>().ok(), Some(id));
    }
    if let Ok(id) = s.parse::<TaskId>() {
        assert_eq!(id.to_string().parse::<TaskId>().ok(), Some(id));
    }
    match s.parse::<TenantId>() {
        Ok(id) => {
            assert_eq!(id.as_str(), s.as_ref());
            assert!(!id.as_str().is_empty() && id.as_str().len() <= 128);
            assert!(!id.as_str().chars().any(char::is_control));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct TypedPayload {
    order_id: String,
    qty: Option<u32>,
    tags: Vec<String>,
}

/// Task payloads: JSON text → a task (size-checked) → the typed payload a handler decodes
/// (`serde_json::from_value::<P>`, as the worker pool does). The limit applies to PostgreSQL's
/// JSON text of the payload (`queue::payload_size`), which is never shorter than the compact
/// JSON text by more than one byte (a lone `-0` prints as `0`).
pub fn task_payload(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if let Ok(task) = NewTask::new("fuzz", &v) {
        let ok = task.validate().is_ok();
        let measured = payload_size(&v);
        assert_eq!(
            ok,
            measured.as_ref().is_ok_and(|n| *n <= MAX_PAYLOAD_BYTES),
            "{measured:?}"
        );
        let compact = serde_json::to_string(&v).map(|s| s.len()).unwrap_or(0);
        if let Ok(n) = measured {
            assert!(n + 1 >= compact, "measured {n}, compact {compact}");
        }
        if compact > MAX_PAYLOAD_BYTES + 1 {
            assert!(!ok, "compact size {compact}");
        }
    }
    let _ = serde_json::from_value::<TypedPayload>(v.clone());
    let _ = serde_json::from_value::<serde_json::Map<String, Value>>(v);
}

/// Tool arguments checked against a JSON schema (and schemas themselves, which come from
/// tool definitions): the first line is the schema, the rest the arguments.
pub fn tool_arguments(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (a, b) = text.split_once('\n').unwrap_or((&text, ""));
    let fixed = json!({
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "minLength": 1, "maxLength": 64},
            "qty": {"type": "integer", "minimum": 1, "maximum": 100},
            "kind": {"enum": ["a", "b"]},
            "tags": {"type": "array", "items": {"type": "string"}}
        },
        "required": ["order_id"],
        "additionalProperties": false
    });
    if let Ok(args) = serde_json::from_str::<Value>(a) {
        let errors = pgcrew::agent::schema::validate(&fixed, &args);
        if !args.is_object() {
            assert!(!errors.is_empty(), "non-object accepted: {args}");
        }
    }
    if let (Ok(schema), Ok(args)) = (
        serde_json::from_str::<Value>(a),
        serde_json::from_str::<Value>(b),
    ) && pgcrew::agent::schema::check_schema(&schema).is_ok()
    {
        let _ = pgcrew::agent::schema::validate(&schema, &args);
    }
}
