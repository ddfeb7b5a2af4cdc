//! The OpenAI-compatible adapter's configuration from the environment.

use super::*;

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
