//! Tool steps: unknown outcomes and reconciliation, rejected calls.

use super::*;

#[tokio::test]
async fn payment_tool_unknown_outcome_is_reconciled_with_the_same_key() {
    let (t, scope) = setup(&["payments:charge"], None).await;
    let provider = Arc::new(Provider::default());
    let k = payment_kernel(&t.db, &provider);
    let args = json!({"amount_cents": 1250, "card": "4242"});

    let err = k
        .step_tool(&scope, "pay", "charge_credit_card", args.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ToolOutcomeUnknown { .. }), "{err}");
    // Calling the step again does not re-execute it: it still needs reconciliation.
    let again = k
        .step_tool(&scope, "pay", "charge_credit_card", args.clone())
        .await
        .unwrap_err();
    assert!(matches!(again, Error::ToolOutcomeUnknown { .. }), "{again}");
    assert_eq!(provider.body_runs.load(Ordering::SeqCst), 1);

    let done = k.reconcile_tool(&scope, "pay").await.unwrap();
    assert!(done.reconciled);
    assert_eq!(done.output["charge_id"], "ch_0");
    assert_eq!(done.output["amount_cents"], 1250);

    // A recorded completion is never re-executed.
    let replay = k
        .step_tool(&scope, "pay", "charge_credit_card", args.clone())
        .await
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.output, done.output);
    let again = k.reconcile_tool(&scope, "pay").await.unwrap();
    assert!(again.replayed);

    assert!(provider.body_runs.load(Ordering::SeqCst) <= 2);
    assert_eq!(provider.keys_seen.lock().unwrap().len(), 1);
    assert_eq!(provider.charges.lock().unwrap().len(), 1);
    assert_eq!(done.idempotency_key, replay.idempotency_key);

    let evs = events(&t.db, &scope).await;
    assert_eq!(count(&evs, "tool_requested"), 1);
    assert_eq!(count(&evs, "tool_outcome_unknown"), 1);
    assert_eq!(count(&evs, "tool_completed"), 1);
    assert!(
        runs::verify_run_chain(&t.db, scope.run)
            .await
            .unwrap()
            .valid
    );
}

#[tokio::test]
async fn crash_between_requested_and_completed_needs_reconciliation() {
    let (t, scope) = setup(&["payments:charge"], None).await;
    let provider = Arc::new(Provider::default());
    // The first instance "crashed" after recording tool_requested: simulate by recording it.
    let key = Kernel::idempotency_key(scope.run, "pay");
    runs::append_event(
        &t.db,
        scope.run,
        runs::NewEvent::new(
            "tool_requested",
            json!({"tool": "charge_credit_card", "arguments": {"amount_cents": 99, "card": "4242"},
                   "idempotency_key": key}),
        )
        .step("pay"),
        None,
    )
    .await
    .unwrap();
    provider.body_runs.store(1, Ordering::SeqCst); // the crashed attempt ran the body once
    let k = payment_kernel(&t.db, &provider);
    let err = charge(
        &k,
        &scope,
        "pay",
        json!({"amount_cents": 99, "card": "4242"}),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::ToolOutcomeUnknown { .. }), "{err}");
    assert_eq!(provider.body_runs.load(Ordering::SeqCst), 1);
    let done = k.reconcile_tool(&scope, "pay").await.unwrap();
    assert_eq!(done.idempotency_key, key);
    assert_eq!(done.output["amount_cents"], 99);
    assert_eq!(provider.body_runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn tool_rejections_are_recorded_and_the_tool_does_not_run() {
    // The tenant lacks payments:charge.
    let (t, scope) = setup(&[], None).await;
    let provider = Arc::new(Provider::default());
    let k = payment_kernel(&t.db, &provider);

    let bad = charge(
        &k,
        &scope,
        "s1",
        json!({"amount_cents": "ten", "card": "4242", "extra": 1}),
    )
    .await
    .unwrap_err();
    let text = bad.to_string();
    assert!(matches!(bad, Error::InvalidInput { .. }), "{text}");
    assert!(text.contains("/amount_cents: expected integer"), "{text}");
    assert!(text.contains("unexpected property `extra`"), "{text}");

    let unknown = k
        .step_tool(&scope, "s2", "launch_rockets", json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(&unknown, Error::NotFound { kind: "tool", .. }),
        "{unknown}"
    );

    let denied = charge(&k, &scope, "s3", json!({"amount_cents": 5, "card": "4242"}))
        .await
        .unwrap_err();
    assert!(matches!(denied, Error::CapabilityDenied { .. }), "{denied}");
    assert_eq!(provider.body_runs.load(Ordering::SeqCst), 0);

    let evs = events(&t.db, &scope).await;
    assert_eq!(count(&evs, "tool_requested"), 0);
    let rejected: Vec<_> = evs
        .iter()
        .filter(|(t, _, _)| t == "tool_rejected")
        .collect();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0].1.as_deref(), Some("s1"));
    assert_eq!(rejected[0].2["reason"], "invalid_arguments");
    assert_eq!(rejected[1].2["reason"], "unknown_tool");
    let denied: Vec<_> = evs
        .iter()
        .filter(|(t, _, _)| t == "capability_denied")
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].2["capability"], "payments:charge");

    // Broken definitions are rejected at build time.
    assert!(
        Tool::builder("bad name!")
            .handler(|_, a| async move { Ok(a) })
            .build()
            .is_err()
    );
    assert!(
        Tool::builder("t")
            .input_schema(json!({"type": "strnig"}))
            .handler(|_, a| async move { Ok(a) })
            .build()
            .is_err()
    );
    assert!(Tool::builder("t").build().is_err());
}
