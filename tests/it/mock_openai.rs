//! A two-turn OpenAI-compatible chat server on loopback for agent tests: turn 0 answers with
//! the given tool calls, turn 1 with a final text. While `hang` is set, a turn-1 request never
//! gets an answer (decided when it arrives), so an instance can be killed while it waits.
//! Records the turn of every request received and of every response written.

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
