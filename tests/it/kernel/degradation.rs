//! Degradation (issue #19): a tenant's degradation rules applied by the kernel to its model
//! steps, recorded as `budget_degraded` in the run's ledger and re-used on replay.

use pgcrew::tenancy::{
    BudgetStatus, CostCategory, CostInput, DegradationAction, DegradationPolicy,
};

use super::*;

/// Tenant `acme` with a 1 USD budget, `policy`, and `spent` USD already charged (0.85: WARNING,
/// 0.95: CRITICAL), and a run of it.
async fn degrading(policy: DegradationPolicy, spent: f64) -> (TestDb, RunScope) {
    let (t, scope) = setup(&[], Some(1.0)).await;
    let mut ctx = tenancy::get(&t.db, &scope.tenant).await.unwrap().context;
    ctx.degradation = policy;
    tenancy::upsert(&t.db, &ctx).await.unwrap();
    tenancy::charge(
        &t.db,
        &scope.tenant,
        None,
        &CostInput::other(CostCategory::Other, spent),
    )
    .await
    .unwrap();
    (t, scope)
}

fn switch_at_warning() -> DegradationPolicy {
    DegradationPolicy::default().rule(
        BudgetStatus::Warning,
        DegradationAction::SwitchModel {
            from: Some("gpt-4o".into()),
            to: "gpt-4o-mini".into(),
        },
    )
}

fn big_request(prompt: &str) -> ModelRequest {
    ModelRequest::new("gpt-4o").user(prompt).max_tokens(50)
}

#[tokio::test]
async fn a_switch_model_rule_at_warning_switches_the_model_of_a_step() {
    let (t, scope) = degrading(switch_at_warning(), 0.85).await;
    assert_eq!(
        tenancy::get(&t.db, &scope.tenant).await.unwrap().status,
        BudgetStatus::Warning
    );
    let model = Arc::new(ScriptedModel::sequence(vec![ScriptedReply::text("ok")]));
    let k = kernel(&t.db, model.clone(), ToolRegistry::new());
    let step = k
        .step_model(&scope, "m1", &big_request("hi"), ReplayPolicy::Strict)
        .await
        .unwrap();
    let sent = model.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].model, "gpt-4o-mini", "the degraded model is called");
    // Charged at the degraded model's price.
    let prices = PriceTable::builtin();
    let u = &step.response.usage;
    let cost = prices
        .cost("gpt-4o-mini", u.prompt_tokens, u.completion_tokens)
        .unwrap();
    assert!(
        (step.cost_usd - cost).abs() < 1e-12,
        "{} vs {cost}",
        step.cost_usd
    );
    let evs = events(&t.db, &scope).await;
    let types: Vec<&str> = evs
        .iter()
        .filter(|(_, k, _)| k.as_deref() == Some("m1"))
        .map(|(t, _, _)| t.as_str())
        .collect();
    assert_eq!(
        types,
        ["budget_degraded", "model_requested", "model_completed"]
    );
    let d = &evs
        .iter()
        .find(|(t, _, _)| t == "budget_degraded")
        .unwrap()
        .2;
    assert_eq!(d["status"], "WARNING");
    assert_eq!(d["requested_model"], "gpt-4o");
    assert_eq!(d["model"], "gpt-4o-mini");
    assert_eq!(d["requested_max_tokens"], 50);
    assert_eq!(d["max_tokens"], 50);
    assert_eq!(d["skip"], false);
    assert_eq!(d["applied"][0]["action"], "switch_model");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("gpt-4o -> gpt-4o-mini"),
        "{d}"
    );
    let requested = &evs
        .iter()
        .find(|(t, _, _)| t == "model_requested")
        .unwrap()
        .2;
    assert_eq!(requested["model"], "gpt-4o-mini");
    let completed = &evs
        .iter()
        .find(|(t, _, _)| t == "model_completed")
        .unwrap()
        .2;
    assert_eq!(completed["model"], "gpt-4o-mini");
    // The fingerprint stays the caller's request's.
    assert_eq!(
        completed["fingerprint"],
        big_request("hi").fingerprint().unwrap()
    );
    let conn = t.db.get().await.unwrap();
    let m: String = conn
        .query_one(
            "SELECT model FROM pgcrew.cost_entries WHERE run_id = $1 AND category = 'llm'",
            &[&scope.run.as_uuid()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(m, "gpt-4o-mini");
}

#[tokio::test]
async fn a_token_cap_and_a_switch_are_reserved_for_what_is_sent() {
    let policy = switch_at_warning().rule(
        BudgetStatus::Warning,
        DegradationAction::CapMaxTokens { max_tokens: 16 },
    );
    let (t, scope) = degrading(policy, 0.85).await;
    let model = Arc::new(ScriptedModel::sequence(vec![
        ScriptedReply::text("a"),
        ScriptedReply::text("b"),
    ]));
    let k = kernel(&t.db, model.clone(), ToolRegistry::new());
    let step = k
        .step_model(&scope, "m1", &big_request("hi"), ReplayPolicy::Strict)
        .await
        .unwrap();
    let d = step.degradation.clone().expect("degraded");
    assert_eq!((d.model.as_str(), d.max_tokens), ("gpt-4o-mini", 16));
    assert_eq!(d.applied.len(), 2);
    // No max_tokens set: the default cap (4096) is what gets capped.
    let unset = ModelRequest::new("gpt-4o").user("again");
    k.step_model(&scope, "m2", &unset, ReplayPolicy::Strict)
        .await
        .unwrap();
    let sent = model.requests();
    assert_eq!(sent[0].max_tokens, Some(16));
    assert_eq!(sent[1].max_tokens, Some(16));
    assert!(sent.iter().all(|r| r.model == "gpt-4o-mini"));
    let prices = PriceTable::builtin();
    let evs = events(&t.db, &scope).await;
    for (i, key) in ["m1", "m2"].into_iter().enumerate() {
        let req = &evs
            .iter()
            .find(|(t, k, _)| t == "model_requested" && k.as_deref() == Some(key))
            .unwrap()
            .2;
        assert_eq!(req["max_tokens"], 16);
        let bound = pgcrew::model::tokens::prompt_token_bound(&sent[i]);
        assert_eq!(req["prompt_token_bound"], bound);
        let worst = prices.worst_case_cost("gpt-4o-mini", bound, 16).unwrap();
        let reserved = req["estimate_usd"].as_f64().unwrap();
        assert!((reserved - worst).abs() < 1e-12, "{reserved} vs {worst}");
        let deg = &evs
            .iter()
            .find(|(t, k, _)| t == "budget_degraded" && k.as_deref() == Some(key))
            .unwrap()
            .2;
        assert_eq!(deg["max_tokens"], 16);
    }
    let deg_m2 = &evs
        .iter()
        .find(|(t, k, _)| t == "budget_degraded" && k.as_deref() == Some("m2"))
        .unwrap()
        .2;
    assert_eq!(deg_m2["requested_max_tokens"], 4096);
    // A budget too small for even the degraded estimate is refused; the refusal names both.
    let conn = t.db.get().await.unwrap();
    conn.execute(
        "UPDATE pgcrew.tenants SET budget_usd_limit = spent_usd + 0.0000001 WHERE id = 'acme'",
        &[],
    )
    .await
    .unwrap();
    let err = k
        .step_model(&scope, "m3", &big_request("no room"), ReplayPolicy::Strict)
        .await
        .unwrap_err();
    assert!(err.is_budget_exceeded(), "{err}");
    let evs = events(&t.db, &scope).await;
    let refused = &evs
        .iter()
        .find(|(t, _, _)| t == "budget_exceeded")
        .unwrap()
        .2;
    assert_eq!(refused["model"], "gpt-4o-mini");
    assert_eq!(refused["requested_model"], "gpt-4o");
    assert!(refused["degradation"].as_str().unwrap().contains("capped"));
}

#[tokio::test]
async fn optional_steps_are_skipped_from_critical_and_the_skip_replays() {
    let policy =
        DegradationPolicy::default().rule(BudgetStatus::Critical, DegradationAction::SkipOptional);
    let (t, scope) = degrading(policy.clone(), 0.95).await;
    let model = Arc::new(ScriptedModel::sequence(vec![ScriptedReply::text("needed")]));
    let k = kernel(&t.db, model.clone(), ToolRegistry::new());
    let optional = big_request("nice to have").optional();
    let step = k
        .step_model(&scope, "extra", &optional, ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(step.skipped && !step.replayed);
    assert_eq!(step.cost_usd, 0.0);
    assert!(step.response.content.is_none() && step.response.tool_calls.is_empty());
    assert_eq!(model.calls(), 0);
    let evs = events(&t.db, &scope).await;
    assert_eq!(
        evs.iter()
            .filter(|(_, k, _)| k.as_deref() == Some("extra"))
            .count(),
        1
    );
    let d = &evs
        .iter()
        .find(|(t, _, _)| t == "budget_degraded")
        .unwrap()
        .2;
    assert_eq!(d["skip"], true);
    assert_eq!(d["status"], "CRITICAL");
    assert_eq!(d["applied"][0]["action"], "skip_optional");
    assert_eq!(d["optional"], true);
    // Replayed: skipped again from the record, nothing new recorded.
    let again = k
        .step_model(&scope, "extra", &optional, ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(again.skipped && again.replayed);
    assert_eq!(count(&events(&t.db, &scope).await, "budget_degraded"), 1);
    // A step not marked optional runs; the optional flag is not part of the fingerprint.
    assert_eq!(
        optional.fingerprint().unwrap(),
        big_request("nice to have").fingerprint().unwrap()
    );
    let needed = k
        .step_model(
            &scope,
            "needed",
            &big_request("needed"),
            ReplayPolicy::Strict,
        )
        .await
        .unwrap();
    assert!(!needed.skipped && needed.degradation.is_none());
    assert_eq!(model.calls(), 1);
    assert_eq!(count(&events(&t.db, &scope).await, "budget_degraded"), 1);
    // Structured output cannot be optional.
    let err = k
        .step_model_structured::<Value>(
            &scope,
            "s",
            &big_request("x")
                .output_schema("a", json!({"type": "object"}))
                .optional(),
            ReplayPolicy::Strict,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");

    // At WARNING the CRITICAL rule does not apply: the optional step runs.
    let (t2, scope2) = degrading(policy, 0.85).await;
    let model2 = Arc::new(ScriptedModel::sequence(vec![ScriptedReply::text("ran")]));
    let k2 = kernel(&t2.db, model2.clone(), ToolRegistry::new());
    let ran = k2
        .step_model(&scope2, "extra", &optional, ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(!ran.skipped);
    assert_eq!(model2.calls(), 1);
    assert_eq!(count(&events(&t2.db, &scope2).await, "budget_degraded"), 0);
}

#[tokio::test]
async fn a_resume_after_the_status_went_back_to_healthy_uses_the_recorded_decision() {
    let (t, scope) = degrading(switch_at_warning(), 0.85).await;
    let model = Arc::new(ScriptedModel::sequence(vec![
        ScriptedReply::error(ModelErrorKind::RateLimited, "slow down"),
        ScriptedReply::text("ok"),
        ScriptedReply::text("fresh"),
    ]));
    let k = kernel(&t.db, model.clone(), ToolRegistry::new());
    let err = k
        .step_model(&scope, "m1", &big_request("hi"), ReplayPolicy::Strict)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Model { .. }), "{err}");
    // The limit is raised: the tenant is HEALTHY again.
    let mut ctx = tenancy::get(&t.db, &scope.tenant).await.unwrap().context;
    ctx.budget_usd_limit = Some(100.0);
    tenancy::upsert(&t.db, &ctx).await.unwrap();
    assert_eq!(
        tenancy::get(&t.db, &scope.tenant).await.unwrap().status,
        BudgetStatus::Healthy
    );
    // The step is resumed: the decision recorded when it started stands.
    let step = k
        .step_model(&scope, "m1", &big_request("hi"), ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(!step.replayed);
    let d = step.degradation.clone().expect("the recorded decision");
    assert_eq!(
        (d.status, d.model.as_str()),
        (BudgetStatus::Warning, "gpt-4o-mini")
    );
    let sent = model.requests();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].model, "gpt-4o-mini");
    let evs = events(&t.db, &scope).await;
    assert_eq!(count(&evs, "budget_degraded"), 1, "decided once");
    assert_eq!(count(&evs, "model_requested"), 2);
    assert!(
        evs.iter()
            .filter(|(t, _, _)| t == "model_requested")
            .all(|(_, _, p)| p["model"] == "gpt-4o-mini")
    );
    // Replayed after completion: the recorded output and decision, no call.
    let replay = k
        .step_model(&scope, "m1", &big_request("hi"), ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.response, step.response);
    assert_eq!(replay.degradation, step.degradation);
    assert_eq!(model.calls(), 2);
    // A new step at HEALTHY runs as requested.
    let fresh = k
        .step_model(&scope, "m2", &big_request("new"), ReplayPolicy::Strict)
        .await
        .unwrap();
    assert!(fresh.degradation.is_none());
    assert_eq!(model.requests()[2].model, "gpt-4o");
    assert_eq!(count(&events(&t.db, &scope).await, "budget_degraded"), 1);
}

#[tokio::test]
async fn a_tenant_role_sees_only_its_own_degradation_decisions() {
    let (t, scope) = degrading(switch_at_warning(), 0.85).await;
    let model = Arc::new(ScriptedModel::sequence(vec![ScriptedReply::text("ok")]));
    kernel(&t.db, model, ToolRegistry::new())
        .step_model(&scope, "m1", &big_request("hi"), ReplayPolicy::Strict)
        .await
        .unwrap();
    crate::common::tenant(&t.db, "other", &[], None).await;
    let role = format!("deg_reader_{}", std::process::id());
    let conn = t.db.get().await.unwrap();
    conn.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role}; \
         SELECT pgcrew.grant_tenant_role('{role}', 'other');"
    ))
    .await
    .unwrap();
    conn.batch_execute(&format!("SET ROLE {role}"))
        .await
        .unwrap();
    let other: i64 = conn
        .query_one(
            "SELECT count(*) FROM pgcrew.events WHERE event_type = 'budget_degraded'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    conn.batch_execute(&format!(
        "RESET ROLE; SELECT pgcrew.revoke_tenant_role('{role}'); \
         SELECT pgcrew.grant_tenant_role('{role}', 'acme'); SET ROLE {role}"
    ))
    .await
    .unwrap();
    let own: i64 = conn
        .query_one(
            "SELECT count(*) FROM pgcrew.events WHERE event_type = 'budget_degraded'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    conn.batch_execute(&format!(
        "RESET ROLE; SELECT pgcrew.revoke_tenant_role('{role}'); DROP ROLE {role}"
    ))
    .await
    .unwrap();
    assert_eq!((other, own), (0, 1));
}

#[tokio::test]
async fn an_agent_run_of_a_tenant_at_warning_runs_its_model_steps_degraded() {
    let (t, scope) = degrading(switch_at_warning(), 0.85).await;
    let (tools, _body_runs) = weather_tools();
    let def = AgentDef::new("big-forecaster", "gpt-4o")
        .system_prompt("use the tool")
        .tool("lookup_weather")
        .max_tokens(100)
        .max_iterations(4);
    register_agent(&t.db, &def).await.unwrap();
    register_tools(&t.db, &tools).await.unwrap();
    let model = Arc::new(ScriptedModel::by_turn(weather_script()));
    let rt = agent_runtime(&t.db, model.clone(), tools, "instance-deg");
    let run = submit_run(&rt, &scope.tenant, "u", "big-forecaster", "weather?").await;
    let done = rt.execute(run, None).await.unwrap();
    assert_eq!(done.state, runs::RunState::Completed);
    let sent = model.requests();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|r| r.model == "gpt-4o-mini"), "{sent:?}");
    let evs = events(&t.db, &RunScope::new(run, scope.tenant.clone())).await;
    assert_eq!(count(&evs, "budget_degraded"), 2, "one per model step");
    assert!(
        evs.iter()
            .filter(|(t, _, _)| t == "model_completed")
            .all(|(_, _, p)| p["model"] == "gpt-4o-mini")
    );
}

/// Issue #23: `pgcrew.no_degradation_at`, asked by every model step's start whether the
/// tenant's policy has a rule active at its budget status, was a SQL function PostgreSQL cannot
/// inline, so each call parsed and planned its body again, once per transaction (2,000 plans in
/// 2,000 calls of `bench agents`). Now a PL/pgSQL function (V052) that keeps its plans for the
/// session. Its answers are unchanged; thirty calls from PL/pgSQL, each its own statement, with
/// the policy in a record as `pgcrew.model_step_begin` passes it: from the 21st on, a call plans
/// nothing (before, one plan each).
#[tokio::test]
async fn the_degradation_check_plans_once_per_session() {
    let t = crate::common::test_db().await;
    let conn = t.db.get().await.unwrap();
    let rule = r#"{"rules": [{"at": "CRITICAL", "action": "skip_optional"}]}"#;
    for (policy, status, expected) in [
        (None, "HEALTHY", false),
        (Some("{}"), "HEALTHY", true),
        (Some(r#"{"rules": null}"#), "EXCEEDED", true),
        (Some(r#"{"rules": 5}"#), "HEALTHY", false),
        (Some("[]"), "HEALTHY", false),
        (Some(rule), "WARNING", true),
        (Some(rule), "CRITICAL", false),
        (Some(rule), "EXCEEDED", false),
        (Some(rule), "NO SUCH STATUS", false),
    ] {
        let policy: Option<Value> = policy.map(|p| serde_json::from_str(p).unwrap());
        let got: bool = conn
            .query_one(
                "SELECT pgcrew.no_degradation_at($1::jsonb, $2::text)",
                &[&policy, &status.to_string()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, expected, "{policy:?} at {status}");
    }
    // As pgcrew.model_step_begin asks it: from PL/pgSQL, the policy and status in a record
    // read from a row, once per statement (each its own transaction).
    conn.batch_execute(
        "CREATE FUNCTION public.degradation_probe(p jsonb, s text) RETURNS boolean \
         LANGUAGE plpgsql AS $$ DECLARE t record; BEGIN \
           SELECT p AS degradation_policy, s AS budget_status INTO t; \
           RETURN NOT pgcrew.no_degradation_at(t.degradation_policy, t.budget_status); \
         END $$",
    )
    .await
    .unwrap();
    let (c, _driver, mut notes) = crate::common::planner_session(&t.db).await;
    let probe = c
        .prepare("SELECT public.degradation_probe($1::jsonb, $2::text)")
        .await
        .unwrap();
    let policy: Value = serde_json::from_str(rule).unwrap();
    let mut degraded = 0;
    let mut plans = Vec::new();
    for i in 0..30 {
        crate::common::drain(&mut notes);
        let status = ["HEALTHY", "WARNING", "CRITICAL"][i % 3].to_string();
        let yes: bool = c
            .query_one(&probe, &[&policy, &status])
            .await
            .unwrap()
            .get(0);
        degraded += usize::from(yes);
        plans.push(crate::common::planned(&mut notes));
    }
    assert_eq!(
        degraded, 10,
        "a rule at CRITICAL is active in one status of three"
    );
    assert!(
        plans[..5].iter().sum::<usize>() > 0,
        "no planning reported ({plans:?}): the test does not see the planner's log lines"
    );
    assert_eq!(
        plans[20..],
        [0; 10],
        "statements planned per degradation check, call by call: {plans:?}"
    );
}
