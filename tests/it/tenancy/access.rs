//! Access: row-level security, capabilities, unknown prices and invalid input.

use super::*;

#[tokio::test]
async fn rls_hides_other_tenants_rows() {
    let t = test_db().await;
    let a = tenant(&t.db, "tenant-a", None).await;
    let b = tenant(&t.db, "tenant-b", None).await;
    let run_a = new_run(&t.db, &a).await;
    let run_b = new_run(&t.db, &b).await;
    for (tenant, run) in [(&a, run_a), (&b, run_b)] {
        tenancy::charge(
            &t.db,
            tenant,
            Some(run),
            &CostInput::llm("gpt-4o", 10, 10, 0.5),
        )
        .await
        .unwrap();
        tenancy::reserve(&t.db, &ReserveRequest::new(tenant.clone(), 0.1).run(run))
            .await
            .unwrap();
        let conn = t.db.get().await.unwrap();
        conn.execute(
            "INSERT INTO pgcrew.tasks (queue, kind, tenant_id, run_id) VALUES ('q', 'k', $1, $2)",
            &[tenant, &run],
        )
        .await
        .unwrap();
        conn.execute(
            "INSERT INTO pgcrew.artifacts (run_id, key, version, value) VALUES ($1, 'k', 1, '{}')",
            &[&run],
        )
        .await
        .unwrap();
        conn.execute(
            "INSERT INTO pgcrew.summaries (run_id, summary_type, content_text) VALUES ($1, 's', 'x')",
            &[&run],
        )
        .await
        .unwrap();
        conn.execute(
            "INSERT INTO pgcrew.sessions (id, tenant_id, identifier) VALUES ($1, $2, 'chat')",
            &[&uuid::Uuid::new_v4(), tenant],
        )
        .await
        .unwrap();
        conn.query(
            "SELECT * FROM pgcrew.append_events($1, NULL, ARRAY['model_completed'], ARRAY['s1'], ARRAY['{\"cost_usd\": 0.5}'::jsonb], ARRAY[false])",
            &[&run],
        )
        .await
        .unwrap();
    }
    // A role of our own (roles are cluster-wide: unique name), not the owner.
    let role = format!("reader_{}", uuid::Uuid::new_v4().simple());
    let conn = t.db.get().await.unwrap();
    conn.batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        .await
        .unwrap();
    let granted = tenancy::grant_tenant_access(&t.db, &role).await.unwrap();
    for table in [
        "runs",
        "events",
        "cost_entries",
        "tenants",
        "tenant_costs",
        "budget_status",
        "tasks",
        "artifacts",
        "summaries",
        "sessions",
    ] {
        assert!(
            granted.iter().any(|g| g == table),
            "{table} not in {granted:?}"
        );
    }
    let mut cfg = t.db.config().clone();
    cfg.user(&role).password("pw");
    let (client, conn_task) = {
        let (c, connection) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        (c, tokio::spawn(connection))
    };
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    // No setting: nothing at all.
    assert_eq!(count("SELECT count(*) FROM pgcrew.runs").await, 0);
    assert_eq!(count("SELECT count(*) FROM pgcrew.tenants").await, 0);
    // The old way (a setting) binds nothing any more.
    client
        .batch_execute("SET pgcrew.tenant_id = 'tenant-a'")
        .await
        .unwrap();
    assert_eq!(count("SELECT count(*) FROM pgcrew.runs").await, 0);
    // The protected mapping does.
    let tenant_a = TenantId::new("tenant-a").unwrap();
    tenancy::grant_tenant_role(&t.db, &role, &tenant_a)
        .await
        .unwrap();
    // One row of every relation is visible (tenant-a's), none of another tenant.
    let tenant_tables = [
        "tasks",
        "sessions",
        "runs",
        "events",
        "cost_entries",
        "budget_reservations",
        "tenant_costs",
        "budget_status",
    ];
    let checks = tenant_tables
        .iter()
        .chain(&["tenants", "artifacts", "summaries"])
        .map(|table| (format!("SELECT count(*) FROM pgcrew.{table}"), 1));
    let foreign = tenant_tables.iter().map(|table| {
        let sql = format!("SELECT count(*) FROM pgcrew.{table} WHERE tenant_id <> 'tenant-a'");
        (sql, 0)
    });
    for (sql, n) in checks.chain(foreign) {
        assert_eq!(scalar_on(&client, &sql).await, n, "{sql}");
    }
    let spend: Vec<(String, f64)> = client
        .query(
            "SELECT tenant_id, COALESCE(SUM((payload ->> 'cost_usd')::double precision), 0.0) AS spend FROM pgcrew.events WHERE event_type = 'model_completed' GROUP BY tenant_id;",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(spend, vec![("tenant-a".to_string(), 0.5)]);
    // The reader cannot write.
    assert!(
        client
            .execute("UPDATE pgcrew.tenants SET spent_usd = 0", &[])
            .await
            .is_err()
    );
    // The owner still sees everything.
    let all = scalar_on(&conn, "SELECT count(*) FROM pgcrew.runs").await;
    assert_eq!(all, 2);
    drop(client);
    let _ = conn_task.await;
    conn.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn capability_checks() {
    let t = test_db().await;
    let ctx =
        TenantContext::new("acme")
            .unwrap()
            .capabilities(["web_search", "web_search", "email"]);
    assert!(tenancy::upsert(&t.db, &ctx).await.unwrap());
    let acme = tid("acme");
    let stored = tenancy::get(&t.db, &acme).await.unwrap();
    assert_eq!(stored.context.capabilities, vec!["email", "web_search"]);
    tenancy::require_capability(&t.db, &acme, "search", Some("web_search"))
        .await
        .unwrap();
    tenancy::require_capability(&t.db, &acme, "clock", None)
        .await
        .unwrap();
    let err = tenancy::require_capability(&t.db, &acme, "shell", Some("exec"))
        .await
        .unwrap_err();
    match &err {
        Error::CapabilityDenied {
            tenant,
            capability,
            tool,
        } => assert_eq!(
            (tenant.as_str(), capability.as_str(), tool.as_str()),
            ("acme", "exec", "shell")
        ),
        e => panic!("unexpected {e}"),
    }
    assert!(err.to_string().contains("lacks `exec`"), "{err}");
    // In the caller's transaction (where the kernel records the audit event).
    let mut conn = t.db.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    assert!(matches!(
        tenancy::require_capability(&tx, &acme, "shell", Some("exec")).await,
        Err(Error::CapabilityDenied { .. })
    ));
    assert!(matches!(
        tenancy::require_capability(&tx, &tid("ghost"), "shell", Some("exec")).await,
        Err(Error::NotFound { kind: "tenant", .. })
    ));
    tx.rollback().await.unwrap();
    assert!(stored.context.check_capability("x", Some("email")).is_ok());
    assert!(stored.context.check_capability("x", Some("root")).is_err());
}

#[tokio::test]
async fn unknown_model_price_is_a_clear_error() {
    let prices = PriceTable::builtin();
    let err = prices
        .worst_case_cost("mystery-model", 100, 100)
        .unwrap_err();
    assert!(matches!(err, Error::UnknownModelPrice(ref m) if m == "mystery-model"));
    assert!(err.to_string().contains("mystery-model"));
    let prices = prices.with("mystery-model", 1.0, 2.0).unwrap();
    assert_eq!(
        prices
            .worst_case_cost("mystery-model", 1_000_000, 1_000_000)
            .unwrap(),
        3.0
    );
}

#[tokio::test]
async fn invalid_input_is_rejected_and_changes_nothing() {
    let t = test_db().await;
    let acme = tenant(&t.db, "acme", Some(5.0)).await;
    let before = tenancy::get(&t.db, &acme).await.unwrap();

    for bad in [-1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e12] {
        let ctx = before.context.clone().budget_usd(Some(bad));
        let err = tenancy::upsert(&t.db, &ctx).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    field: "budget_usd_limit",
                    ..
                }
            ),
            "{bad}: {err}"
        );
    }
    let err = TenantContext::new("").unwrap_err();
    assert!(err.to_string().contains("must not be empty"), "{err}");
    let err = TenantContext::new("x".repeat(129)).unwrap_err();
    assert!(err.to_string().contains("at most 128"), "{err}");
    assert!(TenantContext::new("x".repeat(128)).is_ok());
    let bad_limits = before.context.clone().limits(Some(0), None);
    assert!(matches!(
        tenancy::upsert(&t.db, &bad_limits).await,
        Err(Error::InvalidInput {
            field: "max_concurrent_runs",
            ..
        })
    ));
    let mut bad_thresholds = before.context.clone();
    bad_thresholds.thresholds = BudgetThresholds {
        warning: 0.95,
        critical: 0.9,
    };
    assert!(tenancy::upsert(&t.db, &bad_thresholds).await.is_err());
    let bad_caps = before.context.clone().capabilities([""]);
    assert!(tenancy::upsert(&t.db, &bad_caps).await.is_err());
    // Reservations and costs with bad amounts.
    for bad in [-0.5, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            tenancy::reserve(&t.db, &ReserveRequest::new(acme.clone(), bad)).await,
            Err(Error::InvalidInput { .. })
        ));
        assert!(matches!(
            tenancy::charge(
                &t.db,
                &acme,
                None,
                &CostInput::other(CostCategory::Other, bad)
            )
            .await,
            Err(Error::InvalidInput { .. })
        ));
    }
    // Unknown tenant.
    assert!(matches!(
        tenancy::reserve(&t.db, &ReserveRequest::new(tid("ghost"), 0.1)).await,
        Err(Error::NotFound { kind: "tenant", .. })
    ));
    let after = tenancy::get(&t.db, &acme).await.unwrap();
    assert_eq!(after.context, before.context);
    assert_eq!((after.spent_usd, after.reserved_usd), (0.0, 0.0));
    assert_eq!(after.updated_at, before.updated_at);
    assert_eq!(tenancy::list(&t.db).await.unwrap().len(), 2); // default + acme
}
