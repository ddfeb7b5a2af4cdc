//! Model port integration tests: the OpenAI-compatible adapter against a mock
//! OpenAI-compatible HTTP server on 127.0.0.1 (minimal HTTP/1.1 over tokio, counting calls and
//! recording requests), and the scripted offline model.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgcrew::Error;
use pgcrew::model::{
    FinishReason, Message, ModelPort, ModelRequest, ModelResponse, OpenAiConfig, OpenAiModel,
    ScriptedModel, ScriptedReply, ToolSpec, Usage,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------
// Mock OpenAI-compatible server
// ---------------------------------------------------------------------------------------------

/// One request the mock received.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Value,
}

/// What the mock answers.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    body: String,
    delay: Duration,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }
    fn status(status: u16, body: Value) -> Self {
        Self {
            status,
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }
    fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Handler = Arc<dyn Fn(usize, &Value) -> Reply + Send + Sync>;

struct MockServer {
    base_url: String,
    calls: Arc<AtomicUsize>,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockServer {
    /// Start a server answering call `n` (0-based) with `handler(n, body)`.
    async fn start(handler: impl Fn(usize, &Value) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let (c, r) = (calls.clone(), recorded.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (c, r, h) = (c.clone(), r.clone(), handler.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, c, r, h).await;
                });
            }
        });
        Self {
            base_url: format!("http://{addr}/v1"),
            calls,
            recorded,
            task,
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn recorded(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    calls: Arc<AtomicUsize>,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    handler: Handler,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[header_end + 4..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let n = calls.fetch_add(1, Ordering::SeqCst);
    recorded.lock().unwrap().push(Recorded {
        method,
        path,
        headers,
        body: body.clone(),
    });
    let reply = handler(n, &body);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let response = format!(
        "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        reply.status,
        reply.body.len(),
        reply.body
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// A chat completion body.
fn completion(content: Option<&str>, tool_calls: Option<Value>, finish: &str) -> Value {
    let mut message = json!({"role": "assistant", "content": content});
    if let Some(tc) = tool_calls {
        message["tool_calls"] = tc;
    }
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000u32,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    })
}

fn text_completion(text: &str) -> Value {
    completion(Some(text), None, "stop")
}

fn api_error(message: &str, ty: &str) -> Value {
    json!({"error": {"message": message, "type": ty, "param": null, "code": null}})
}

/// An adapter pointed at the mock with fast backoff.
fn adapter(server: &MockServer, retries: u32, timeout: Duration) -> OpenAiModel {
    OpenAiModel::new(
        OpenAiConfig::builder()
            .base_url(&server.base_url)
            .api_key("sk-test")
            .timeout(timeout)
            .max_retries(retries)
            .initial_backoff(Duration::from_millis(10))
            .max_backoff(Duration::from_millis(40))
            .build()
            .unwrap(),
    )
}

fn model_kind(e: &Error) -> &str {
    match e {
        Error::Model { kind, .. } => kind,
        other => panic!("expected Error::Model, got {other:?}"),
    }
}

fn weather_tool() -> ToolSpec {
    ToolSpec::new(
        "get_weather",
        "current weather for a city",
        json!({
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"]
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// OpenAI-compatible adapter
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn openai_plain_completion_with_usage() {
    let server = MockServer::start(|_, _| Reply::ok(text_completion("Hello there"))).await;
    let model = adapter(&server, 3, Duration::from_secs(10));
    let request = ModelRequest::new("gpt-4o-mini")
        .system("be brief")
        .user("Say hello")
        .max_tokens(30)
        .temperature(0.7)
        .extra("seed", json!(42));
    let r = model.complete(&request).await.unwrap();
    assert_eq!(r.content_text(), "Hello there");
    assert_eq!(r.usage, Usage::new(12, 7));
    assert_eq!(r.finish_reason, FinishReason::Stop);
    assert_eq!(r.model, "gpt-4o-mini-2024-07-18");
    assert!(r.tool_calls.is_empty());
    // The dated model name prices at its base model.
    let cost = r.cost(&pgcrew::model::PriceTable::builtin()).unwrap();
    assert!(
        (cost - (12.0 * 0.15 + 7.0 * 0.60) / 1e6).abs() < 1e-12,
        "{cost}"
    );

    assert_eq!(server.calls(), 1);
    let rec = &server.recorded()[0];
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.path, "/v1/chat/completions");
    assert_eq!(rec.headers.get("authorization").unwrap(), "Bearer sk-test");
    assert_eq!(rec.body["model"], "gpt-4o-mini");
    assert_eq!(rec.body["max_tokens"], 30);
    assert_eq!(rec.body["temperature"], json!(0.7));
    assert_eq!(rec.body["seed"], 42);
    assert_eq!(rec.body["messages"][0]["role"], "system");
    assert_eq!(rec.body["messages"][1]["content"], "Say hello");
    assert!(rec.body.get("tools").is_none());
    assert!(rec.body.get("response_format").is_none());
}

#[tokio::test]
async fn openai_tool_call_round_trip() {
    let server = MockServer::start(|n, _| {
        if n == 0 {
            Reply::ok(completion(
                None,
                Some(json!([{
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"days\":2}"}
                }])),
                "tool_calls",
            ))
        } else {
            Reply::ok(text_completion("Sunny in Paris"))
        }
    })
    .await;
    let model = adapter(&server, 0, Duration::from_secs(10));
    let mut request = ModelRequest::new("gpt-4o-mini")
        .user("Weather in Paris?")
        .tool(weather_tool());
    let first = model.complete(&request).await.unwrap();
    assert_eq!(first.finish_reason, FinishReason::ToolCalls);
    assert_eq!(first.tool_calls.len(), 1);
    let call = &first.tool_calls[0];
    assert_eq!(call.id, "call_abc");
    assert_eq!(call.name, "get_weather");
    assert_eq!(call.arguments, json!({"city": "Paris", "days": 2}));

    // The request carried the tool.
    let rec = server.recorded();
    assert_eq!(rec[0].body["tools"][0]["type"], "function");
    assert_eq!(rec[0].body["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(
        rec[0].body["tools"][0]["function"]["parameters"]["required"],
        json!(["city"])
    );

    // Send the tool result back.
    request.messages.push(Message::from_response(&first));
    request
        .messages
        .push(Message::tool_result("call_abc", r#"{"sky":"sunny"}"#));
    let second = model.complete(&request).await.unwrap();
    assert_eq!(second.content_text(), "Sunny in Paris");
    let rec = server.recorded();
    assert_eq!(rec.len(), 2);
    let msgs = rec[1].body["messages"].as_array().unwrap();
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["tool_calls"][0]["id"], "call_abc");
    let args: Value = serde_json::from_str(
        msgs[1]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(args, json!({"city": "Paris", "days": 2}));
    assert_eq!(msgs[2]["role"], "tool");
    assert_eq!(msgs[2]["tool_call_id"], "call_abc");
    assert_eq!(msgs[2]["content"], r#"{"sky":"sunny"}"#);
}

#[tokio::test]
async fn openai_tool_call_with_invalid_json_arguments_is_invalid_output() {
    let server = MockServer::start(|_, _| {
        Reply::ok(completion(
            None,
            Some(json!([{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{city: Paris"}
            }])),
            "tool_calls",
        ))
    })
    .await;
    let model = adapter(&server, 3, Duration::from_secs(10));
    let err = model
        .complete(
            &ModelRequest::new("gpt-4o-mini")
                .user("x")
                .tool(weather_tool()),
        )
        .await
        .unwrap_err();
    assert_eq!(model_kind(&err), "invalid_output");
    assert!(err.to_string().contains("get_weather"), "{err}");
    assert_eq!(server.calls(), 1, "invalid output is not retried");
}

#[derive(Debug, Deserialize, PartialEq)]
struct Weather {
    city: String,
    temperature_c: f64,
}

fn weather_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"city": {"type": "string"}, "temperature_c": {"type": "number"}},
        "required": ["city", "temperature_c"],
        "additionalProperties": false
    })
}

#[tokio::test]
async fn openai_structured_output_parsed_and_invalid_json_rejected() {
    let server = MockServer::start(|n, _| match n {
        0 => Reply::ok(text_completion(r#"{"city":"Oslo","temperature_c":-3.5}"#)),
        1 => Reply::ok(text_completion("It is cold in Oslo")),
        _ => Reply::ok(text_completion(r#"{"city":"Oslo"}"#)),
    })
    .await;
    let model = adapter(&server, 0, Duration::from_secs(10));
    let request = ModelRequest::new("gpt-4o-mini")
        .user("Weather in Oslo as JSON")
        .output_schema_strict("weather", weather_schema());

    let r = model.complete(&request).await.unwrap();
    let w: Weather = r.parse_output().unwrap();
    assert_eq!(
        w,
        Weather {
            city: "Oslo".into(),
            temperature_c: -3.5
        }
    );
    let rec = server.recorded();
    let rf = &rec[0].body["response_format"];
    assert_eq!(rf["type"], "json_schema");
    assert_eq!(rf["json_schema"]["name"], "weather");
    assert_eq!(rf["json_schema"]["strict"], true);
    assert_eq!(rf["json_schema"]["schema"], weather_schema());

    // Not JSON at all.
    let r = model.complete(&request).await.unwrap();
    let err = r.parse_output::<Weather>().unwrap_err();
    assert_eq!(model_kind(&err), "invalid_output");
    assert!(err.to_string().contains("invalid JSON"), "{err}");

    // JSON, but not a Weather.
    let r = model.complete(&request).await.unwrap();
    let err = r.parse_output::<Weather>().unwrap_err();
    assert_eq!(model_kind(&err), "invalid_output");
    assert!(err.to_string().contains("does not match"), "{err}");
    assert_eq!(server.calls(), 3);
}

#[tokio::test]
async fn openai_429_then_200_succeeds_after_one_retry() {
    let server = MockServer::start(|n, _| {
        if n == 0 {
            Reply::status(429, api_error("Rate limit reached", "requests"))
        } else {
            Reply::ok(text_completion("after retry"))
        }
    })
    .await;
    let model = adapter(&server, 3, Duration::from_secs(10));
    let r = model
        .complete(&ModelRequest::new("gpt-4o-mini").user("hi"))
        .await
        .unwrap();
    assert_eq!(r.content_text(), "after retry");
    assert_eq!(server.calls(), 2, "one failed attempt and one retry");
    // Both attempts sent the same body.
    let rec = server.recorded();
    assert_eq!(rec[0].body, rec[1].body);
}

#[tokio::test]
async fn openai_persistent_500_is_server_error_after_configured_retries() {
    for retries in [0u32, 2] {
        let server =
            MockServer::start(|_, _| Reply::status(500, json!({"error": {"message": "boom"}})))
                .await;
        let model = adapter(&server, retries, Duration::from_secs(10));
        let err = model
            .complete(&ModelRequest::new("gpt-4o-mini").user("hi"))
            .await
            .unwrap_err();
        assert_eq!(model_kind(&err), "server", "{err}");
        assert!(err.to_string().contains("500"), "{err}");
        assert_eq!(
            server.calls(),
            retries as usize + 1,
            "async-openai must not retry on its own"
        );
    }
}

#[tokio::test]
async fn openai_timeout_is_a_timeout_error_and_is_retried() {
    let server = MockServer::start(|_, _| {
        Reply::ok(text_completion("too late")).delayed(Duration::from_secs(3))
    })
    .await;
    let model = adapter(&server, 1, Duration::from_millis(300));
    let err = model
        .complete(&ModelRequest::new("gpt-4o-mini").user("hi"))
        .await
        .unwrap_err();
    assert_eq!(model_kind(&err), "timeout", "{err}");
    assert!(
        common_eventually_calls(&server, 2).await,
        "the timed-out attempt was retried once: saw {} calls",
        server.calls()
    );
}

async fn common_eventually_calls(server: &MockServer, n: usize) -> bool {
    crate::common::eventually(Duration::from_secs(5), || async { server.calls() == n }).await
}

#[tokio::test]
async fn openai_non_retryable_errors_are_typed_and_sent_once() {
    for (status, body, kind) in [
        (
            401,
            api_error("Incorrect API key", "invalid_request_error"),
            "auth",
        ),
        (
            400,
            api_error("bad param", "invalid_request_error"),
            "invalid_request",
        ),
        (
            429,
            api_error("You exceeded your current quota", "insufficient_quota"),
            "quota_exceeded",
        ),
    ] {
        let server = MockServer::start(move |_, _| Reply::status(status, body.clone())).await;
        let model = adapter(&server, 3, Duration::from_secs(10));
        let err = model
            .complete(&ModelRequest::new("gpt-4o-mini").user("hi"))
            .await
            .unwrap_err();
        assert_eq!(model_kind(&err), kind, "{err}");
        assert_eq!(server.calls(), 1, "{kind} must not be retried");
    }
}

#[tokio::test]
async fn openai_connection_refused_is_a_connection_error() {
    // Reserve a port, then close it so nothing listens there.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let model = OpenAiModel::new(
        OpenAiConfig::builder()
            .base_url(format!("http://{addr}/v1"))
            .max_retries(1)
            .initial_backoff(Duration::from_millis(5))
            .max_backoff(Duration::from_millis(10))
            .build()
            .unwrap(),
    );
    let err = model
        .complete(&ModelRequest::new("llama3").user("hi"))
        .await
        .unwrap_err();
    assert_eq!(model_kind(&err), "connection", "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[tokio::test]
async fn openai_non_completion_body_is_invalid_response() {
    let server = MockServer::start(|_, _| Reply::ok(json!({"hello": "world"}))).await;
    let model = adapter(&server, 3, Duration::from_secs(10));
    let err = model
        .complete(&ModelRequest::new("gpt-4o-mini").user("hi"))
        .await
        .unwrap_err();
    assert_eq!(model_kind(&err), "invalid_response", "{err}");
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn openai_invalid_request_is_rejected_before_sending() {
    let server = MockServer::start(|_, _| Reply::ok(text_completion("x"))).await;
    let model = adapter(&server, 3, Duration::from_secs(10));
    for bad in [
        ModelRequest::new("gpt-4o-mini"),
        ModelRequest::new("gpt-4o-mini").user("x").temperature(9.0),
        ModelRequest::new("gpt-4o-mini")
            .user("x")
            .extra("messages", json!([])),
        ModelRequest::new("gpt-4o-mini")
            .user("x")
            .tool(ToolSpec::new(
                "no spaces allowed",
                "",
                json!({"type": "object"}),
            )),
    ] {
        let err = model.complete(&bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    }
    assert_eq!(server.calls(), 0, "nothing was sent");
}

#[tokio::test]
async fn openai_config_from_env_map() {
    let server = MockServer::start(|_, _| Reply::ok(text_completion("from env"))).await;
    let vars: HashMap<String, String> = [
        (
            "OPENAI_BASE_URL".to_string(),
            format!("{}/", server.base_url),
        ),
        ("OPENAI_API_KEY".to_string(), "sk-from-env".to_string()),
    ]
    .into_iter()
    .collect();
    let config = OpenAiConfig::from_env_map(&vars)
        .max_retries(0)
        .build()
        .unwrap();
    assert_eq!(config.base_url(), server.base_url);
    assert_eq!(config.timeout(), Duration::from_secs(60));
    let model = OpenAiModel::new(config);
    let r = model
        .complete(&ModelRequest::new("llama3.1").user("hi"))
        .await
        .unwrap();
    assert_eq!(r.content_text(), "from env");
    let rec = &server.recorded()[0];
    assert_eq!(rec.path, "/v1/chat/completions");
    assert_eq!(
        rec.headers.get("authorization").unwrap(),
        "Bearer sk-from-env"
    );

    // An explicit builder value beats the environment.
    let config = OpenAiConfig::from_env_map(&vars)
        .api_key("sk-explicit")
        .build()
        .unwrap();
    OpenAiModel::new(config)
        .complete(&ModelRequest::new("llama3.1").user("hi"))
        .await
        .unwrap();
    assert_eq!(
        server.recorded()[1].headers.get("authorization").unwrap(),
        "Bearer sk-explicit"
    );
}

#[tokio::test]
async fn openai_concurrent_calls_each_reach_the_server_once() {
    let server = MockServer::start(|_, body| {
        // Echo the prompt back so each caller can check it got its own answer.
        let prompt = body["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        Reply::ok(text_completion(&format!("echo {prompt}"))).delayed(Duration::from_millis(50))
    })
    .await;
    let model = Arc::new(adapter(&server, 0, Duration::from_secs(10)));
    let mut handles = Vec::new();
    for i in 0..16 {
        let model = model.clone();
        handles.push(tokio::spawn(async move {
            let r = model
                .complete(&ModelRequest::new("gpt-4o-mini").user(format!("p{i}")))
                .await
                .unwrap();
            assert_eq!(r.content_text(), format!("echo p{i}"));
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(server.calls(), 16);
}

// ---------------------------------------------------------------------------------------------
// Scripted model
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn scripted_sequence_counts_calls_and_reports_exhaustion() {
    let model = ScriptedModel::sequence(vec![
        ScriptedReply::text("first"),
        ScriptedReply::tool_call("get_weather", json!({"city": "Rome"})),
        ScriptedReply::error("rate_limited", "scripted 429"),
    ]);
    let req = ModelRequest::new("gpt-4o-mini")
        .user("hi")
        .tool(weather_tool());
    // An invalid request is counted but does not use up a scripted reply.
    let err = model.complete(&ModelRequest::new("m")).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    assert_eq!(model.complete(&req).await.unwrap().content_text(), "first");
    let second = model.complete(&req).await.unwrap();
    assert_eq!(second.finish_reason, FinishReason::ToolCalls);
    assert_eq!(second.tool_calls[0].name, "get_weather");
    assert_eq!(second.tool_calls[0].arguments, json!({"city": "Rome"}));
    assert_eq!(second.tool_calls[0].id, "call_0_0");
    let err = model.complete(&req).await.unwrap_err();
    assert_eq!(model_kind(&err), "rate_limited");
    let err = model.complete(&req).await.unwrap_err();
    assert_eq!(model_kind(&err), "script_exhausted");
    assert_eq!(model.calls(), 5);
    assert_eq!(model.requests().len(), 5);
    assert_eq!(model.name(), "scripted");
}

#[tokio::test]
async fn scripted_by_turn_is_a_pure_function_of_the_request() {
    let script = || {
        ScriptedModel::by_turn(vec![
            ScriptedReply::tool_call("get_weather", json!({"city": "Lima"})),
            ScriptedReply::text("Lima is warm"),
        ])
    };
    let a = script();
    let b = script();
    let req = ModelRequest::new("gpt-4o-mini")
        .user("Lima?")
        .tool(weather_tool());
    let r1 = a.complete(&req).await.unwrap();
    // The same request again (a replay on another instance) gets the same answer.
    assert_eq!(a.complete(&req).await.unwrap(), r1);
    assert_eq!(b.complete(&req).await.unwrap(), r1);
    let next = req
        .clone()
        .message(Message::from_response(&r1))
        .message(Message::tool_result(&r1.tool_calls[0].id, "{\"temp\":24}"));
    let r2 = b.complete(&next).await.unwrap();
    assert_eq!(r2.content_text(), "Lima is warm");
    assert_eq!(a.calls(), 2);
    assert_eq!(b.calls(), 2);
}

#[tokio::test]
async fn scripted_usage_is_realistic_and_respects_max_tokens() {
    let long = "x".repeat(400); // ~100 tokens
    let model = ScriptedModel::by_turn(vec![ScriptedReply::text(long.clone())]);
    let prompt = "y".repeat(80); // ~20 tokens + framing
    let free = model
        .complete(&ModelRequest::new("m").user(prompt.clone()))
        .await
        .unwrap();
    assert_eq!(free.usage.completion_tokens, 100);
    assert_eq!(free.usage.prompt_tokens, 20 + 4);
    assert!(!free.usage.estimated);
    assert_eq!(free.finish_reason, FinishReason::Stop);
    assert_eq!(free.content_text(), long);

    let capped = model
        .complete(&ModelRequest::new("m").user(prompt).max_tokens(10))
        .await
        .unwrap();
    assert_eq!(capped.usage.completion_tokens, 10);
    assert_eq!(capped.finish_reason, FinishReason::Length);
    assert_eq!(capped.content_text().chars().count(), 40);
}

#[derive(Debug, Deserialize)]
struct DemoSummary {
    summary: String,
    results: Vec<String>,
    tool_count: i64,
}

#[tokio::test]
async fn scripted_demo_agent_calls_tools_then_summarises() {
    let model = ScriptedModel::demo_agent();
    let lookup = ToolSpec::new(
        "lookup_order",
        "find an order",
        json!({"type": "object", "properties": {"query": {"type": "string"}}}),
    );
    let mut req = ModelRequest::new("gpt-4o-mini")
        .system("you are a demo")
        .user("Weather in Paris for 3 days")
        .tool(weather_tool())
        .tool(lookup);

    let first = model.complete(&req).await.unwrap();
    assert_eq!(first.finish_reason, FinishReason::ToolCalls);
    assert_eq!(first.tool_calls.len(), 2, "each tool is called once");
    assert_eq!(first.tool_calls[0].name, "get_weather");
    assert_eq!(
        first.tool_calls[0].arguments,
        json!({"city": "Weather in Paris for 3 days", "days": 3})
    );
    assert_eq!(
        first.tool_calls[1].arguments,
        json!({"query": "Weather in Paris for 3 days"})
    );
    assert!(first.usage.prompt_tokens > 0 && first.usage.completion_tokens > 0);

    req.messages.push(Message::from_response(&first));
    req.messages
        .push(Message::tool_result(&first.tool_calls[0].id, "sunny, 21C"));
    req.messages.push(Message::tool_result(
        &first.tool_calls[1].id,
        "order 7 shipped",
    ));
    let second = model.complete(&req).await.unwrap();
    assert_eq!(second.finish_reason, FinishReason::Stop);
    let text = second.content_text();
    assert!(text.contains("get_weather returned sunny, 21C"), "{text}");
    assert!(
        text.contains("lookup_order returned order 7 shipped"),
        "{text}"
    );

    // With an output schema the final answer is JSON shaped by it.
    let structured = req.clone().output_schema(
        "summary",
        json!({
            "type": "object",
            "properties": {
                "summary": {"type": "string"},
                "results": {"type": "array", "items": {"type": "string"}},
                "tool_count": {"type": "integer"}
            }
        }),
    );
    let third = model.complete(&structured).await.unwrap();
    let s: DemoSummary = third.parse_output().unwrap();
    assert!(s.summary.contains("get_weather"), "{s:?}");
    assert_eq!(s.results, vec!["sunny, 21C", "order 7 shipped"]);
    assert_eq!(s.tool_count, 2);

    // Without tools it just answers.
    let plain = model
        .complete(&ModelRequest::new("m").user("hello"))
        .await
        .unwrap();
    assert!(plain.content_text().contains("hello"));
    assert_eq!(model.calls(), 4);
}

#[tokio::test]
async fn scripted_from_fn_and_validation() {
    let model = ScriptedModel::from_fn(|req| {
        let prompt = req.last_user_text().unwrap_or("").to_uppercase();
        ScriptedModel::reply(req, &ScriptedReply::text(prompt))
    })
    .named("shouty");
    assert_eq!(model.name(), "shouty");
    let r: ModelResponse = model
        .complete(&ModelRequest::new("m").user("quiet please"))
        .await
        .unwrap();
    assert_eq!(r.content_text(), "QUIET PLEASE");
    assert_eq!(r.model, "m");
    // Invalid requests are rejected like the real adapter does (and still counted).
    let err = model.complete(&ModelRequest::new("m")).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    assert_eq!(model.calls(), 2);
}

#[tokio::test]
async fn scripted_model_works_as_a_trait_object() {
    let ports: Vec<Arc<dyn ModelPort>> = vec![
        Arc::new(ScriptedModel::demo_agent()),
        Arc::new(ScriptedModel::sequence(vec![ScriptedReply::json(
            json!({"city": "Oslo", "temperature_c": 1.0}),
        )])),
    ];
    let req = ModelRequest::new("m")
        .user("Oslo")
        .output_schema("weather", weather_schema());
    let w: Weather = ports[1]
        .complete(&req)
        .await
        .unwrap()
        .parse_output()
        .unwrap();
    assert_eq!(w.city, "Oslo");
    let demo: Weather = ports[0]
        .complete(&req)
        .await
        .unwrap()
        .parse_output()
        .unwrap();
    assert!(demo.city.contains("Oslo"));
}
