//! The OpenAI-compatible adapter's failures: retries, timeouts, typed errors, refused
//! connections, invalid bodies and requests.

use super::*;

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
    let r = say_hi(&model).await.unwrap();
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
        let err = say_hi(&model).await.unwrap_err();
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
    let err = say_hi(&model).await.unwrap_err();
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
        let err = say_hi(&model).await.unwrap_err();
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
    let err = say_hi(&model).await.unwrap_err();
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
