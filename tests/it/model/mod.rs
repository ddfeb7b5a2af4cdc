//! Model port integration tests: the OpenAI-compatible adapter against a mock
//! OpenAI-compatible HTTP server on 127.0.0.1 (minimal HTTP/1.1 over tokio, counting calls and
//! recording requests), and the scripted offline model; one file per concern, with the mock
//! server and the helpers they share here.

mod completion;
mod config;
mod failures;
mod scripted;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgcrew::Error;
use pgcrew::model::{
    FinishReason, Message, ModelErrorKind, ModelPort, ModelRequest, ModelResponse, OpenAiConfig,
    OpenAiModel, ScriptedModel, ScriptedReply, ToolSpec, Usage,
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

/// `model`'s answer to a plain "hi" for gpt-4o-mini.
async fn say_hi(model: &OpenAiModel) -> pgcrew::Result<ModelResponse> {
    model
        .complete(&ModelRequest::new("gpt-4o-mini").user("hi"))
        .await
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
        Error::Model { kind, .. } => kind.as_str(),
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
