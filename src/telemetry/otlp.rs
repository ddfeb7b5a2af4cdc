//! The OTLP/HTTP (protobuf) span exporter behind [`otlp_layer`](super::trace::otlp_layer).
//!
//! Spans are written straight from the SDK's `SpanData` into the protobuf bytes of an
//! `ExportTraceServiceRequest` (with `prost`'s wire-format primitives, field numbers from the
//! OTLP `trace.proto`) and posted with a blocking `reqwest` client on the export thread. The
//! exporter of `opentelemetry-otlp` first converts each span into the generated message types
//! (an owned copy of every id, name and attribute), then encodes them, computing nested lengths
//! again at every level, then drops the copies: measured with callgrind in `pgcrew bench
//! queue`, about 14,800 instructions per span against about 2,800 here, which at one span per
//! task was most of what tracing cost the queue. The bytes decode to exactly the message the
//! generated types give (tested against `opentelemetry-proto`).
//!
//! Configuration follows the OTLP exporter specification for HTTP: the endpoint
//! (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as is, else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`,
//! else `http://localhost:4318/v1/traces`), headers (`OTEL_EXPORTER_OTLP_HEADERS`, then
//! `OTEL_EXPORTER_OTLP_TRACES_HEADERS`: `key=value` pairs separated by commas, values
//! percent-decoded) and the timeout in milliseconds (`OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, else
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, default 10 s). Only `http/protobuf` without compression is
//! spoken: another `OTEL_EXPORTER_OTLP_PROTOCOL` or a compression setting logs a warning.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::TraceState;
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceFlags};
use opentelemetry::{Array, InstrumentationScope, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::SpanData;
use prost::encoding::{WireType, encode_key, encode_varint};

use super::TaskSpan;
use super::export::Export;
use super::task_span::TASK_SPAN_NAME;

/// Where and how spans are posted.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct OtlpConfig {
    /// The full traces URL.
    pub url: String,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Per request.
    pub timeout: Duration,
}

impl OtlpConfig {
    /// The configuration the environment describes; `traces_url` (when given) wins over it.
    pub(super) fn from_env(traces_url: Option<&str>) -> OtlpConfig {
        Self::from_vars(traces_url, |k| {
            std::env::var(k).ok().filter(|v| !v.trim().is_empty())
        })
    }

    fn from_vars(traces_url: Option<&str>, var: impl Fn(&str) -> Option<String>) -> OtlpConfig {
        let url = match (
            traces_url,
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(u), _, _) => u.trim().to_string(),
            (None, Some(u), _) => u.trim().to_string(),
            (None, None, Some(base)) => format!("{}/v1/traces", base.trim().trim_end_matches('/')),
            (None, None, None) => "http://localhost:4318/v1/traces".to_string(),
        };
        let mut headers: Vec<(String, String)> = Vec::new();
        for k in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            for (name, value) in var(k).as_deref().map(parse_headers).unwrap_or_default() {
                headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
                headers.push((name, value));
            }
        }
        let millis = |k: &str| var(k).and_then(|v| v.trim().parse::<u64>().ok());
        let timeout = millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|| millis("OTEL_EXPORTER_OTLP_TIMEOUT"))
            .map_or(Duration::from_secs(10), Duration::from_millis);
        for k in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = var(k).filter(|p| p.trim() != "http/protobuf") {
                tracing::warn!(variable = k, value = %p, "OpenTelemetry: pgcrew exports traces over http/protobuf only; the setting is ignored");
            }
        }
        for k in [
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ] {
            if let Some(c) = var(k).filter(|c| c.trim() != "none") {
                tracing::warn!(variable = k, value = %c, "OpenTelemetry: pgcrew sends traces uncompressed; the setting is ignored");
            }
        }
        OtlpConfig {
            url,
            headers,
            timeout,
        }
    }
}

/// `key=value` pairs separated by commas, values percent-decoded; malformed pairs are skipped.
fn parse_headers(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() {
                return None;
            }
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .ok()?
                .into_owned();
            Some((k.to_string(), v))
        })
        .collect()
}

/// The exporter: one blocking HTTP client, the resource encoded once.
#[derive(Debug)]
pub(super) struct OtlpHttp {
    client: reqwest::blocking::Client,
    config: OtlpConfig,
    resource: Resource,
}

impl OtlpHttp {
    /// Build the client (on the export thread: a blocking client must not be built or dropped
    /// on an async runtime's thread).
    pub(super) fn new(config: OtlpConfig) -> Result<OtlpHttp, String> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &config.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("OTLP header name {k:?}: {e}"))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|e| format!("OTLP header {k}: {e}"))?;
            headers.insert(name, value);
        }
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/x-protobuf"),
        );
        let client = reqwest::blocking::Client::builder()
            .timeout(config.timeout)
            .default_headers(headers)
            .build()
            .map_err(|e| format!("OTLP HTTP client: {e}"))?;
        Ok(OtlpHttp {
            client,
            config,
            resource: Resource::builder_empty().build(),
        })
    }
}

impl Export for OtlpHttp {
    fn export(&mut self, spans: Vec<SpanData>, tasks: Vec<TaskSpan>) -> OTelSdkResult {
        let body = encode_request(&self.resource, &spans, &tasks);
        drop((spans, tasks));
        let response = self
            .client
            .post(&self.config.url)
            .body(body)
            .send()
            .map_err(|e| OTelSdkError::InternalFailure(format!("OTLP export: {e}")))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(OTelSdkError::InternalFailure(format!(
                "OTLP export to {}: HTTP {status}",
                self.config.url
            )))
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.clone();
    }

    fn shutdown(&mut self) -> OTelSdkResult {
        Ok(())
    }
}

// Field numbers of opentelemetry/proto/{collector/trace,trace,common,resource}/v1.
const REQUEST_RESOURCE_SPANS: u32 = 1;
const RESOURCE_SPANS_RESOURCE: u32 = 1;
const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
const RESOURCE_SPANS_SCHEMA_URL: u32 = 3;
const RESOURCE_ATTRIBUTES: u32 = 1;
const SCOPE_SPANS_SCOPE: u32 = 1;
const SCOPE_SPANS_SPANS: u32 = 2;
const SCOPE_SPANS_SCHEMA_URL: u32 = 3;
const SCOPE_NAME: u32 = 1;
const SCOPE_VERSION: u32 = 2;
const SCOPE_ATTRIBUTES: u32 = 3;

/// `ExportTraceServiceRequest` bytes for `spans` and the worker pools' `tasks` of `resource`,
/// one `ScopeSpans` per instrumentation scope (in the order scopes first appear; task spans are
/// pgcrew's, after its other spans).
pub(super) fn encode_request(
    resource: &Resource,
    spans: &[SpanData],
    tasks: &[TaskSpan],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + (spans.len() + tasks.len()) * 192);
    if spans.is_empty() && tasks.is_empty() {
        return out;
    }
    let pgcrew = super::trace::scope();
    nested(&mut out, REQUEST_RESOURCE_SPANS, |b| {
        nested(b, RESOURCE_SPANS_RESOURCE, |b| {
            for (k, v) in resource.iter() {
                key_value(b, RESOURCE_ATTRIBUTES, k.as_str(), v);
            }
        });
        let mut scopes: Vec<&InstrumentationScope> = Vec::new();
        for s in spans {
            if !scopes.contains(&&s.instrumentation_scope) {
                scopes.push(&s.instrumentation_scope);
            }
        }
        if !tasks.is_empty() && !scopes.contains(&&pgcrew) {
            scopes.push(&pgcrew);
        }
        for scope in scopes {
            nested(b, RESOURCE_SPANS_SCOPE_SPANS, |b| {
                nested(b, SCOPE_SPANS_SCOPE, |b| {
                    string(b, SCOPE_NAME, scope.name());
                    string(b, SCOPE_VERSION, scope.version().unwrap_or_default());
                    for kv in scope.attributes() {
                        key_value(b, SCOPE_ATTRIBUTES, kv.key.as_str(), &kv.value);
                    }
                });
                for s in spans.iter().filter(|s| &s.instrumentation_scope == scope) {
                    nested(b, SCOPE_SPANS_SPANS, |b| span(b, s));
                }
                if scope == &pgcrew {
                    for t in tasks {
                        nested(b, SCOPE_SPANS_SPANS, |b| task_span(b, t));
                    }
                }
                string(
                    b,
                    SCOPE_SPANS_SCHEMA_URL,
                    scope.schema_url().unwrap_or_default(),
                );
            });
        }
        if let Some(url) = resource.schema_url() {
            string(b, RESOURCE_SPANS_SCHEMA_URL, url);
        }
    });
    out
}

/// One `Span` message of a worker pool's task span: the fields [`span`] writes for the same
/// span as `SpanData` ([`TaskSpan::into_span_data`]), from the task's figures directly.
fn task_span(b: &mut Vec<u8>, t: &TaskSpan) {
    bytes(b, 1, &t.trace_id.to_bytes());
    bytes(b, 2, &t.span_id.to_bytes());
    if t.trace_state != TraceState::NONE {
        string(b, 3, &t.trace_state.header());
    }
    if t.parent_span_id != SpanId::INVALID {
        bytes(b, 4, &t.parent_span_id.to_bytes());
    }
    string(b, 5, TASK_SPAN_NAME);
    varint(b, 6, kind(&SpanKind::Internal));
    fixed64(b, 7, nanos(t.start));
    fixed64(b, 8, nanos(t.end));
    key_with(b, 9, "queue", |b| any_str(b, &t.queue));
    key_with(b, 9, "kind", |b| any_str(b, &t.kind));
    key_with(b, 9, "task_id", |b| any_i64(b, t.task_id));
    key_with(b, 9, "attempt", |b| any_i64(b, t.attempt));
    if let Some(run) = t.run_id {
        let mut buf = uuid::Uuid::encode_buffer();
        let run = run.0.hyphenated().encode_lower(&mut buf);
        key_with(b, 9, "run_id", |b| any_str(b, run));
    }
    key_with(b, 9, "queue_wait_ms", |b| any_f64(b, t.queue_wait_ms));
    nested(b, 15, |b| {
        if let Some(e) = &t.error {
            string(b, 2, e);
            varint(b, 3, 2);
        }
    });
    fixed32(
        b,
        16,
        flags(t.parent_is_remote(), TraceFlags::SAMPLED.to_u8()),
    );
}

/// One `Span` message.
fn span(b: &mut Vec<u8>, s: &SpanData) {
    let cx = &s.span_context;
    bytes(b, 1, &cx.trace_id().to_bytes());
    bytes(b, 2, &cx.span_id().to_bytes());
    let state = cx.trace_state().header();
    string(b, 3, &state);
    if s.parent_span_id != SpanId::INVALID {
        bytes(b, 4, &s.parent_span_id.to_bytes());
    }
    string(b, 5, &s.name);
    varint(b, 6, kind(&s.span_kind));
    fixed64(b, 7, nanos(s.start_time));
    fixed64(b, 8, nanos(s.end_time));
    for kv in &s.attributes {
        key_value(b, 9, kv.key.as_str(), &kv.value);
    }
    varint(b, 10, u64::from(s.dropped_attributes_count));
    for e in s.events.iter() {
        nested(b, 11, |b| {
            fixed64(b, 1, nanos(e.timestamp));
            string(b, 2, &e.name);
            for kv in &e.attributes {
                key_value(b, 3, kv.key.as_str(), &kv.value);
            }
            varint(b, 4, u64::from(e.dropped_attributes_count));
        });
    }
    varint(b, 12, u64::from(s.events.dropped_count));
    for l in s.links.iter() {
        nested(b, 13, |b| {
            let lc = &l.span_context;
            bytes(b, 1, &lc.trace_id().to_bytes());
            bytes(b, 2, &lc.span_id().to_bytes());
            string(b, 3, &lc.trace_state().header());
            for kv in &l.attributes {
                key_value(b, 4, kv.key.as_str(), &kv.value);
            }
            varint(b, 5, u64::from(l.dropped_attributes_count));
            fixed32(b, 6, flags(lc.is_remote(), lc.trace_flags().to_u8()));
        });
    }
    varint(b, 14, u64::from(s.links.dropped_count));
    nested(b, 15, |b| {
        if let Status::Error { description } = &s.status {
            string(b, 2, description);
        }
        varint(
            b,
            3,
            match s.status {
                Status::Unset => 0,
                Status::Ok => 1,
                Status::Error { .. } => 2,
            },
        );
    });
    fixed32(
        b,
        16,
        flags(s.parent_span_is_remote, cx.trace_flags().to_u8()),
    );
}

/// `SpanFlags`: the trace flags, "has is-remote" always, "is remote" when the parent is.
fn flags(parent_is_remote: bool, trace_flags: u8) -> u32 {
    u32::from(trace_flags) | 0x100 | if parent_is_remote { 0x200 } else { 0 }
}

fn kind(k: &SpanKind) -> u64 {
    match k {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A `KeyValue` message in field `tag`.
fn key_value(b: &mut Vec<u8>, tag: u32, key: &str, value: &Value) {
    key_with(b, tag, key, |b| any_value(b, value));
}

/// A `KeyValue` message in field `tag` whose `AnyValue` fields `value` writes.
fn key_with(b: &mut Vec<u8>, tag: u32, key: &str, value: impl FnOnce(&mut Vec<u8>)) {
    nested(b, tag, |b| {
        string(b, 1, key);
        nested(b, 2, value);
    });
}

/// `AnyValue.string_value`.
fn any_str(b: &mut Vec<u8>, v: &str) {
    encode_key(1, WireType::LengthDelimited, b);
    encode_varint(v.len() as u64, b);
    b.extend_from_slice(v.as_bytes());
}

/// `AnyValue.int_value`.
fn any_i64(b: &mut Vec<u8>, v: i64) {
    encode_key(3, WireType::Varint, b);
    encode_varint(v as u64, b);
}

/// `AnyValue.double_value`.
fn any_f64(b: &mut Vec<u8>, v: f64) {
    encode_key(4, WireType::SixtyFourBit, b);
    b.extend_from_slice(&v.to_le_bytes());
}

/// The fields of an `AnyValue` message.
fn any_value(b: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(v) => {
            encode_key(2, WireType::Varint, b);
            encode_varint(u64::from(*v), b);
        }
        Value::I64(v) => any_i64(b, *v),
        Value::F64(v) => any_f64(b, *v),
        Value::String(v) => any_str(b, v.as_str()),
        Value::Array(a) => nested(b, 5, |b| {
            // ArrayValue.values (1), each an AnyValue.
            match a {
                Array::Bool(vs) => vs.iter().for_each(|v| {
                    nested(b, 1, |b| any_value(b, &Value::Bool(*v)));
                }),
                Array::I64(vs) => vs.iter().for_each(|v| {
                    nested(b, 1, |b| any_value(b, &Value::I64(*v)));
                }),
                Array::F64(vs) => vs.iter().for_each(|v| {
                    nested(b, 1, |b| any_value(b, &Value::F64(*v)));
                }),
                Array::String(vs) => vs.iter().for_each(|v| {
                    nested(b, 1, |b| any_str(b, v.as_str()));
                }),
                // A kind of array this version does not know: an empty array.
                _ => {}
            }
        }),
        // A kind of value this version does not know: an empty value.
        _ => {}
    }
}

/// A length-delimited field whose content `f` writes in place: a one-byte length is reserved
/// and the content moved when its length needs more (no buffer per message).
fn nested(b: &mut Vec<u8>, tag: u32, f: impl FnOnce(&mut Vec<u8>)) {
    encode_key(tag, WireType::LengthDelimited, b);
    let at = b.len();
    b.push(0);
    f(b);
    let len = (b.len() - at - 1) as u64;
    let mut head = [0u8; 10];
    let n = {
        let mut slice: &mut [u8] = &mut head;
        encode_varint(len, &mut slice);
        10 - slice.len()
    };
    if n > 1 {
        let end = b.len();
        b.resize(end + n - 1, 0);
        b.copy_within(at + 1..end, at + n);
    }
    b[at..at + n].copy_from_slice(&head[..n]);
}

/// A string field (omitted when empty, as proto3 does).
fn string(b: &mut Vec<u8>, tag: u32, s: &str) {
    if !s.is_empty() {
        bytes(b, tag, s.as_bytes());
    }
}

fn bytes(b: &mut Vec<u8>, tag: u32, v: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, b);
    encode_varint(v.len() as u64, b);
    b.extend_from_slice(v);
}

/// A varint field (omitted when zero).
fn varint(b: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::Varint, b);
        encode_varint(v, b);
    }
}

fn fixed64(b: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::SixtyFourBit, b);
        b.extend_from_slice(&v.to_le_bytes());
    }
}

fn fixed32(b: &mut Vec<u8>, tag: u32, v: u32) {
    if v != 0 {
        encode_key(tag, WireType::ThirtyTwoBit, b);
        b.extend_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::Duration;

    use opentelemetry::trace::{
        Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
    use prost::Message;

    use super::*;

    fn span(n: u64, scope: &InstrumentationScope, parent: Option<bool>) -> SpanData {
        let cx = SpanContext::new(
            TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319cu128 + u128::from(n)),
            SpanId::from(0xb7ad_6b71_6920_3331u64 + n),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("vendor", "v1")]).unwrap_or_default(),
        );
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789 + n);
        let mut events = SpanEvents::default();
        events.events = vec![Event::new(
            "retry",
            start + Duration::from_micros(5),
            vec![KeyValue::new("error", "boom")],
            1,
        )];
        events.dropped_count = 2;
        let mut links = SpanLinks::default();
        links.links = vec![Link::new(cx.clone(), vec![KeyValue::new("run", "r")], 0)];
        SpanData {
            span_context: cx.clone(),
            parent_span_id: parent.map_or(SpanId::INVALID, |_| SpanId::from(0x1234 + n)),
            parent_span_is_remote: parent.unwrap_or(false),
            span_kind: if n.is_multiple_of(2) {
                SpanKind::Internal
            } else {
                SpanKind::Consumer
            },
            name: Cow::Owned(format!("pgcrew.task.{n}")),
            start_time: start,
            end_time: start + Duration::from_micros(250 + n),
            attributes: vec![
                KeyValue::new("queue", "default"),
                KeyValue::new("task_id", 1_000_000_000_007i64 + n as i64),
                KeyValue::new("attempt", -3i64),
                KeyValue::new("queue_wait_ms", 1.25f64),
                KeyValue::new("ok", true),
                KeyValue::new(
                    "kinds",
                    Value::Array(Array::String(vec![
                        StringValue::from("a"),
                        StringValue::from(""),
                    ])),
                ),
                KeyValue::new("ns", Value::Array(Array::I64(vec![0, 1, -1]))),
                KeyValue::new("fs", Value::Array(Array::F64(vec![0.5]))),
                KeyValue::new("bs", Value::Array(Array::Bool(vec![false, true]))),
                KeyValue::new("long", "x".repeat(300)),
            ],
            dropped_attributes_count: (n % 3) as u32,
            events,
            links,
            status: match n % 3 {
                0 => Status::Unset,
                1 => Status::Ok,
                _ => Status::error("handler failed"),
            },
            instrumentation_scope: scope.clone(),
        }
    }

    /// What `encode_request` writes decodes to exactly what `opentelemetry-proto`'s own
    /// conversion builds from the same spans and resource.
    #[test]
    fn the_request_decodes_to_what_the_generated_types_build() {
        let pgcrew = InstrumentationScope::builder("pgcrew").build();
        let other = InstrumentationScope::builder("other")
            .with_version("1.2")
            .with_schema_url("https://opentelemetry.io/schemas/1.21.0")
            .with_attributes([KeyValue::new("lib", "x")])
            .build();
        let resource = Resource::builder()
            .with_service_name("svc")
            .with_attribute(KeyValue::new("host.name", "h"))
            .build();
        let spans: Vec<SpanData> = (0..7)
            .map(|n| {
                let scope = if n == 3 { &other } else { &pgcrew };
                span(n, scope, [None, Some(true), Some(false)][n as usize % 3])
            })
            .collect();
        let ours =
            ExportTraceServiceRequest::decode(encode_request(&resource, &spans, &[]).as_slice())
                .expect("our bytes decode");
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                spans.clone(),
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(ours, theirs);
        assert_eq!(ours.resource_spans[0].scope_spans.len(), 2);
        assert!(encode_request(&resource, &[], &[]).is_empty());
        // A span big enough that nested lengths take two and three bytes.
        let mut big = span(9, &pgcrew, None);
        big.attributes
            .push(KeyValue::new("huge", "y".repeat(20_000)));
        let ours = ExportTraceServiceRequest::decode(
            encode_request(&resource, std::slice::from_ref(&big), &[]).as_slice(),
        )
        .expect("our bytes decode");
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                vec![big],
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(ours, theirs);
    }

    fn task(n: u64, remote_parent: bool, run: bool, error: bool) -> TaskSpan {
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_000 + n);
        TaskSpan {
            trace_id: TraceId::from(0x1111_2222_3333_4444_5555_6666_7777_8888u128 + u128::from(n)),
            span_id: SpanId::from(0x0102_0304_0506_0708u64 + n),
            parent_span_id: if remote_parent {
                SpanId::from(0xaaaa + n)
            } else {
                SpanId::INVALID
            },
            trace_state: if remote_parent {
                TraceState::from_key_value([("vendor", "v1")]).unwrap_or_default()
            } else {
                TraceState::default()
            },
            start,
            end: start + Duration::from_micros(300 + n),
            queue: format!("queue-{n}").into(),
            kind: "é-kind".into(),
            task_id: 9_000_000_000 + n as i64,
            attempt: 1 + n as i64,
            run_id: run.then(|| crate::ids::RunId(uuid::Uuid::from_u128(0xfeed + u128::from(n)))),
            queue_wait_ms: 0.125 * n as f64,
            error: error.then(|| format!("handler failed {n}")),
        }
    }

    /// A task span written from its figures decodes to exactly what the generated types build
    /// from the same span as `SpanData`, beside the SDK's spans of the same and another scope.
    #[test]
    fn task_spans_encode_as_their_span_data_does() {
        let pgcrew = InstrumentationScope::builder("pgcrew").build();
        let other = InstrumentationScope::builder("other").build();
        let resource = Resource::builder().with_service_name("svc").build();
        let tasks = vec![
            task(1, false, false, false),
            task(2, true, true, true),
            task(3, true, false, false),
            task(4, false, true, true),
        ];
        for spans in [
            vec![],
            vec![span(5, &pgcrew, None)],
            vec![span(6, &other, Some(true)), span(7, &pgcrew, None)],
        ] {
            let ours = ExportTraceServiceRequest::decode(
                encode_request(&resource, &spans, &tasks).as_slice(),
            )
            .expect("our bytes decode");
            let mut all = spans.clone();
            all.extend(tasks.iter().cloned().map(TaskSpan::into_span_data));
            let theirs = ExportTraceServiceRequest {
                resource_spans: group_spans_by_resource_and_scope(
                    all,
                    &ResourceAttributesWithSchema::from(&resource),
                ),
            };
            assert_eq!(ours, theirs, "beside {} spans", spans.len());
        }
    }

    #[test]
    fn the_configuration_follows_the_otlp_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = OtlpConfig::from_vars(None, env(&[]));
        assert_eq!(c.url, "http://localhost:4318/v1/traces");
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert!(c.headers.is_empty());
        let c = OtlpConfig::from_vars(
            None,
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "api-key=a%20b, x-team = core ,bad",
                ),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "API-KEY=c"),
            ]),
        );
        assert_eq!(c.url, "http://collector:4318/v1/traces");
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(
            c.headers,
            vec![
                ("x-team".to_string(), "core".to_string()),
                ("API-KEY".to_string(), "c".to_string())
            ]
        );
        let c = OtlpConfig::from_vars(
            None,
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://traces:9999/custom",
                ),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "100"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ]),
        );
        assert_eq!(c.url, "http://traces:9999/custom");
        assert_eq!(c.timeout, Duration::from_millis(100));
        let c = OtlpConfig::from_vars(
            Some("http://127.0.0.1:1/v1/traces"),
            env(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://traces:9999/custom",
            )]),
        );
        assert_eq!(c.url, "http://127.0.0.1:1/v1/traces");
    }
}
