//! The scripted offline model.

use super::*;

#[tokio::test]
async fn scripted_sequence_counts_calls_and_reports_exhaustion() {
    let model = ScriptedModel::sequence(vec![
        ScriptedReply::text("first"),
        ScriptedReply::tool_call("get_weather", json!({"city": "Rome"})),
        ScriptedReply::error(ModelErrorKind::RateLimited, "scripted 429"),
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

/// Issue #22's soak: `pgcrew serve` without a model key hosts the demo agent on the scripted
/// model for as long as it runs, and the model kept every request it received (its memory grew
/// by every model call). It keeps the latest `RECORDED_REQUESTS`, oldest first.
#[tokio::test]
async fn scripted_model_keeps_only_the_latest_requests() {
    let model = ScriptedModel::demo_agent();
    let n = pgcrew::model::RECORDED_REQUESTS + 10;
    for i in 0..n {
        model
            .complete(&ModelRequest::new("demo").user(format!("call {i}")))
            .await
            .unwrap();
    }
    assert_eq!(model.calls(), n as u64);
    let kept = model.requests();
    assert_eq!(kept.len(), pgcrew::model::RECORDED_REQUESTS);
    let text = |r: &ModelRequest| serde_json::to_string(&r.messages).unwrap();
    assert!(text(&kept[0]).contains("call 10\""), "{}", text(&kept[0]));
    assert!(text(&kept[kept.len() - 1]).contains(&format!("call {}\"", n - 1)));
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
    let w = weather_from(ports[1].as_ref(), &req).await;
    assert_eq!(w.city, "Oslo");
    let demo = weather_from(ports[0].as_ref(), &req).await;
    assert!(demo.city.contains("Oslo"));
}

/// The structured output of `port`'s answer to `req`, parsed as a [`Weather`].
async fn weather_from(port: &dyn ModelPort, req: &ModelRequest) -> Weather {
    port.complete(req).await.unwrap().parse_output().unwrap()
}
