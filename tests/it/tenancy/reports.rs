//! Reports: the cost breakdown and the `tenants` CLI.

use super::*;

#[tokio::test]
async fn cost_breakdown_by_tenant_model_category_and_day() {
    let t = test_db().await;
    let a = tenant(&t.db, "a", None).await;
    let b = tenant(&t.db, "b", None).await;
    for (tenant, cost) in [
        (&a, CostInput::llm("gpt-4o", 100, 50, 0.25)),
        (&a, CostInput::llm("gpt-4o", 10, 5, 0.125)),
        (&a, CostInput::llm("gpt-4o-mini", 1, 1, 0.01)),
        (&a, CostInput::other(CostCategory::Retrieval, 0.02)),
        (&b, CostInput::other(CostCategory::Storage, 1.0)),
    ] {
        tenancy::charge(&t.db, tenant, None, &cost).await.unwrap();
    }
    let rows = tenancy::cost_breakdown(&t.db, &CostFilter::tenant(a.clone()))
        .await
        .unwrap();
    let key: Vec<(&str, &str, i64, i64, i64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r.category.as_str(),
                r.model.as_str(),
                r.entries,
                r.prompt_tokens,
                r.completion_tokens,
                r.cost_usd,
            )
        })
        .collect();
    assert_eq!(
        key,
        vec![
            ("llm", "gpt-4o", 2, 110, 55, 0.375),
            ("llm", "gpt-4o-mini", 1, 1, 1, 0.01),
            ("retrieval", "", 1, 0, 0, 0.02),
        ]
    );
    let today = chrono::Utc::now().date_naive();
    assert!(
        rows.iter()
            .all(|r| r.tenant_id == "a" && (r.day - today).num_days().abs() <= 1)
    );
    let all = tenancy::cost_breakdown(&t.db, &CostFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 4);
    let future = today + chrono::Days::new(2);
    let none = tenancy::cost_breakdown(
        &t.db,
        &CostFilter {
            since: Some(future),
            ..CostFilter::default()
        },
    )
    .await
    .unwrap();
    assert!(none.is_empty());
    assert!(
        tenancy::cost_breakdown(
            &t.db,
            &CostFilter {
                since: Some(future),
                until: Some(today),
                ..CostFilter::default()
            }
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn cli_tenants_set_list_show() {
    let t = test_db().await;
    let run = |args: &[&str]| {
        std::process::Command::new(crate::common::pgcrew_bin())
            .args(args)
            .env("DATABASE_URL", t.dsn())
            .output()
            .unwrap()
    };
    // A command that must succeed: its output.
    let succeed = |args: &[&str]| {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let out = succeed(&[
        "tenants",
        "set",
        "acme",
        "--capabilities",
        "web,email",
        "--budget-usd",
        "12.5",
        "--max-concurrent-runs",
        "3",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("created tenant acme"));
    // Partial update keeps the other settings.
    let out = succeed(&[
        "tenants",
        "set",
        "acme",
        "--warning-threshold",
        "0.5",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tenant_id"], "acme");
    assert_eq!(v["budget_usd_limit"], 12.5);
    assert_eq!(v["max_concurrent_runs"], 3);
    assert_eq!(v["thresholds"]["warning"], 0.5);
    assert_eq!(v["capabilities"], serde_json::json!(["email", "web"]));
    // Bad input: clear error, exit 2, nothing changed.
    for bad in [
        vec!["tenants", "set", "acme", "--budget-usd", "-1"],
        vec!["tenants", "set", "acme", "--budget-usd", "NaN"],
        vec!["tenants", "set", ""],
        vec!["tenants", "set", "acme", "--critical-threshold", "0.2"],
    ] {
        let out = run(&bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("invalid"),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let long = "x".repeat(129);
    let out = run(&["tenants", "set", &long]);
    assert_eq!(out.status.code(), Some(2));
    tenancy::charge(
        &t.db,
        &tid("acme"),
        None,
        &CostInput::llm("gpt-4o", 5, 5, 1.5),
    )
    .await
    .unwrap();
    let out = succeed(&["tenants", "show", "acme", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tenant"]["budget_usd_limit"], 12.5);
    assert_eq!(v["budget"]["spent_usd"], 1.5);
    assert_eq!(v["budget"]["status"], "HEALTHY");
    assert_eq!(v["costs"][0]["model"], "gpt-4o");
    let out = succeed(&["tenants", "show", "acme"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("capabilities:  email, web"));
    let out = run(&["tenants", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let out = run(&["tenants", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("acme") && text.contains("default"), "{text}");
    let out = run(&["tenants", "show", "ghost"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tenant not found: ghost"));
    let stored = tenancy::get(&t.db, &tid("acme")).await.unwrap();
    assert_eq!(stored.context.budget_usd_limit, Some(12.5));
}
