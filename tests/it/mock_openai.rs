//! A two-turn OpenAI-compatible chat server on loopback for agent tests: turn 0 answers with
//! the given tool calls, turn 1 with a final text. While `hang` is set, a turn-1 request never
//! gets an answer (decided when it arrives), so an instance can be killed while it waits.
//! Records the turn of every request received and of every response written.
//!
//! [`mock_openai_stream`] is a second mock for streaming: server-sent events, a stream cut
//! mid-way, and 429 with `Retry-After`.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// What the mock answers.
pub struct MockScript {
    /// Tool calls of turn 0 (`[{"id", "type": "function", "function": {"name", "arguments"}}]`).
    pub tool_calls: Value,
    /// The final answer of turn 1.
    pub final_text: &'static str,
    /// Latency before each answer.
    pub latency: Duration,
    /// `(prompt_tokens, completion_tokens)` reported per answer.
    pub usage: (u32, u32),
}

/// The running mock; stops when dropped.
pub struct MockOpenAi {
    /// `http://127.0.0.1:PORT/v1`.
    pub base_url: String,
    /// Turn of every request received.
    pub requests: Arc<Mutex<Vec<usize>>>,
    /// Turn of every response written.
    pub answered: Arc<Mutex<Vec<usize>>>,
    /// While set, turn-1 requests are never answered.
    pub hang: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl MockOpenAi {
    /// The turns of every request received, sorted.
    pub fn requested_turns(&self) -> Vec<usize> {
        sorted(&self.requests)
    }

    /// The turns of every response written, sorted.
    pub fn answered_turns(&self) -> Vec<usize> {
        sorted(&self.answered)
    }
}

fn sorted(turns: &Mutex<Vec<usize>>) -> Vec<usize> {
    let mut v = turns.lock().unwrap().clone();
    v.sort();
    v
}

impl Drop for MockOpenAi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Read one HTTP/1.1 request with a JSON body (`None` when the peer closed early).
pub async fn read_json_request(stream: &mut tokio::net::TcpStream) -> Option<Value> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head_end, len) = loop {
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (i + 4, len);
        }
    };
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    serde_json::from_slice(&buf[head_end..]).ok()
}

/// Start the mock with `hang` set.
pub async fn mock_openai(script: MockScript) -> MockOpenAi {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let answered = Arc::new(Mutex::new(Vec::new()));
    let hang = Arc::new(AtomicBool::new(true));
    let (rq, an, hg) = (requests.clone(), answered.clone(), hang.clone());
    let script = Arc::new(script);
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (rq, an, hg, script) = (rq.clone(), an.clone(), hg.clone(), script.clone());
            tokio::spawn(async move {
                let Some(body) = read_json_request(&mut stream).await else {
                    return;
                };
                let turn = body["messages"]
                    .as_array()
                    .map(|m| m.iter().filter(|m| m["role"] == "assistant").count())
                    .unwrap_or(0);
                rq.lock().unwrap().push(turn);
                let hang_this = turn > 0 && hg.load(Ordering::SeqCst);
                tokio::time::sleep(script.latency).await;
                let message = if turn == 0 {
                    json!({"role": "assistant", "content": null, "tool_calls": script.tool_calls})
                } else {
                    if hang_this {
                        std::future::pending::<()>().await;
                    }
                    json!({"role": "assistant", "content": script.final_text})
                };
                let finish = if turn == 0 { "tool_calls" } else { "stop" };
                let (p, c) = script.usage;
                let out = json!({
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000u32,
                    "model": "gpt-4o-mini",
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                })
                .to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                    out.len()
                );
                if stream.write_all(response.as_bytes()).await.is_ok() {
                    an.lock().unwrap().push(turn);
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    MockOpenAi {
        base_url,
        requests,
        answered,
        hang,
        task,
    }
}

// ------------------------------------------------------------------------------------------
// Streaming mock: server-sent events, cut streams, 429 with Retry-After
// ------------------------------------------------------------------------------------------

/// What the streaming mock does with one request (the replies are used in order; the last one
/// repeats).
#[derive(Clone, Debug)]
pub enum MockReply {
    /// Answer `chunks` of text, `gap` apart: as server-sent events (chunked transfer encoding,
    /// then a finish reason, a usage chunk and `[DONE]`) when the request asks to stream, else
    /// as one JSON completion.
    Stream {
        chunks: Vec<&'static str>,
        gap: Duration,
        usage: (u32, u32),
    },
    /// Stream `chunks`, then close the connection in the middle of the chunked body.
    Cut { chunks: Vec<&'static str> },
    /// HTTP 429 with this `Retry-After` value.
    RateLimited { retry_after: String },
}

/// The running streaming mock; stops when dropped.
pub struct StreamMock {
    /// `http://127.0.0.1:PORT/v1`.
    pub base_url: String,
    /// When each request arrived, with its body.
    pub requests: Arc<Mutex<Vec<(std::time::Instant, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StreamMock {
    /// How many requests arrived.
    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// The body of request `i`.
    pub fn body(&self, i: usize) -> Value {
        self.requests.lock().unwrap()[i].1.clone()
    }

    /// The time between request `i` and request `i + 1`.
    pub fn gap_after(&self, i: usize) -> Duration {
        let r = self.requests.lock().unwrap();
        r[i + 1].0 - r[i].0
    }
}

impl Drop for StreamMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn chunk_json(delta: Value, finish: Value, usage: Value) -> String {
    let choices = if delta.is_null() {
        json!([])
    } else {
        json!([{"index": 0, "delta": delta, "finish_reason": finish}])
    };
    json!({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1_700_000_000u32,
           "model": "gpt-4o-mini", "choices": choices, "usage": usage})
    .to_string()
}

/// One server-sent event as one HTTP chunk.
fn sse_chunk(data: &str) -> Vec<u8> {
    let event = format!("data: {data}\n\n");
    format!("{:x}\r\n{event}\r\n", event.len()).into_bytes()
}

async fn answer(stream: &mut tokio::net::TcpStream, reply: &MockReply, streamed: bool) {
    use tokio::io::AsyncWriteExt;
    match reply {
        MockReply::RateLimited { retry_after } => {
            let body = r#"{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":null}}"#;
            let head = format!(
                "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: {retry_after}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
        }
        MockReply::Stream { chunks, usage, .. } if !streamed => {
            let (p, c) = *usage;
            let out = json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000u32,
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": chunks.concat()}}],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
            })
            .to_string();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                out.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
        }
        MockReply::Stream { chunks, .. } | MockReply::Cut { chunks } => {
            let gap = match reply {
                MockReply::Stream { gap, .. } => *gap,
                _ => Duration::ZERO,
            };
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            let first = chunk_json(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
                Value::Null,
            );
            let _ = stream.write_all(&sse_chunk(&first)).await;
            for text in chunks {
                tokio::time::sleep(gap).await;
                let c = chunk_json(json!({"content": text}), Value::Null, Value::Null);
                if stream.write_all(&sse_chunk(&c)).await.is_err() {
                    return;
                }
                let _ = stream.flush().await;
            }
            if let MockReply::Stream { usage: (p, c), .. } = reply {
                let fin = chunk_json(json!({}), json!("stop"), Value::Null);
                let use_ = chunk_json(
                    Value::Null,
                    Value::Null,
                    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}),
                );
                let _ = stream.write_all(&sse_chunk(&fin)).await;
                let _ = stream.write_all(&sse_chunk(&use_)).await;
                let _ = stream.write_all(&sse_chunk("[DONE]")).await;
                let _ = stream.write_all(b"0\r\n\r\n").await;
            }
        }
    }
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

/// Start the streaming mock with `replies`.
pub async fn mock_openai_stream(replies: Vec<MockReply>) -> StreamMock {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let rq = requests.clone();
    let replies = Arc::new(replies);
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (rq, replies) = (rq.clone(), replies.clone());
            tokio::spawn(async move {
                let Some(body) = read_json_request(&mut stream).await else {
                    return;
                };
                let streamed = body["stream"] == json!(true);
                let n = {
                    let mut r = rq.lock().unwrap();
                    r.push((std::time::Instant::now(), body));
                    r.len() - 1
                };
                let reply = replies[n.min(replies.len() - 1)].clone();
                answer(&mut stream, &reply, streamed).await;
            });
        }
    });
    StreamMock {
        base_url,
        requests,
        task,
    }
}
