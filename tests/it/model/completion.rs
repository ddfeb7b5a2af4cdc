//! The OpenAI-compatible adapter's answers: plain completions, tool calls, structured output,
//! concurrent calls.

use super::*;

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
