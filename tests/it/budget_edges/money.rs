//! NaN and infinite money from SQL: the queries, the table rules and the repairing migration.

use super::*;

const SETTLE_SQL: &str = include_str!("../../../sql/queries/tenancy/settle.sql");
const RESERVE_TENANT_SQL: &str = include_str!("../../../sql/queries/tenancy/reserve_tenant.sql");
const INSERT_RESERVATION_SQL: &str =
    include_str!("../../../sql/queries/tenancy/insert_reservation.sql");

async fn money_text(db: &Db, tenant: &TenantId) -> (String, String) {
    let conn = db.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT spent_usd::text, reserved_usd::text FROM pgcrew.tenants WHERE id = $1",
            &[tenant],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn nan_and_infinite_money_is_refused_by_the_sql_queries() {
    let (t, limited) = db_with_tenant("limited", &[], Some(10.0)).await;
    let unlimited = tenant(&t.db, "unlimited", &[], None).await;
    let conn = t.db.get().await.unwrap();
    for bad in [f64::NAN, f64::INFINITY, -1.0] {
        for who in [&limited, &unlimited] {
            let r = conn
                .query(
                    SETTLE_SQL,
                    &[
                        &None::<uuid::Uuid>,
                        who,
                        &None::<uuid::Uuid>,
                        &bad,
                        &"llm",
                        &"m",
                        &"s",
                        &0i64,
                        &0i64,
                    ],
                )
                .await;
            let e = r.expect_err(&format!("settle {bad} for {who} must be refused"));
            let text = Error::from(e).to_string();
            assert!(text.contains("cost_usd"), "{text}");
            let r = conn.query(RESERVE_TENANT_SQL, &[who, &bad]).await;
            assert!(r.is_err(), "reserve {bad} for {who}: {r:?}");
            let r = conn
                .query(
                    INSERT_RESERVATION_SQL,
                    &[
                        &uuid::Uuid::new_v4(),
                        who,
                        &None::<uuid::Uuid>,
                        &None::<String>,
                        &None::<String>,
                        &bad,
                    ],
                )
                .await;
            assert!(r.is_err(), "insert reservation {bad} for {who}: {r:?}");
        }
    }
    drop(conn);
    for who in [&limited, &unlimited] {
        assert_eq!(
            money_text(&t.db, who).await,
            ("0.0000000000".to_string(), "0.0000000000".to_string())
        );
        let tn = tenancy::get(&t.db, who).await.unwrap();
        assert_ne!(tn.status, BudgetStatus::Exceeded);
        tenancy::reserve(&t.db, &ReserveRequest::new(who.clone(), 1.0))
            .await
            .unwrap();
    }
    // Negative token counts too.
    let conn = t.db.get().await.unwrap();
    let r = conn
        .query(
            SETTLE_SQL,
            &[
                &None::<uuid::Uuid>,
                &limited,
                &None::<uuid::Uuid>,
                &0.5f64,
                &"llm",
                &"m",
                &"s",
                &-3i64,
                &0i64,
            ],
        )
        .await;
    assert!(r.is_err(), "negative prompt tokens: {r:?}");
}

#[tokio::test]
async fn the_database_refuses_bad_money_whoever_writes() {
    let (t, acme) = db_with_tenant("acme", &[], Some(10.0)).await;
    let run = new_run(&t.db, &acme).await;
    let conn = t.db.get().await.unwrap();
    let statements: Vec<(&str, String)> = vec![
        ("tenants.spent_usd", "UPDATE pgcrew.tenants SET spent_usd = 'NaN' WHERE id = 'acme'".into()),
        ("tenants.reserved_usd", "UPDATE pgcrew.tenants SET reserved_usd = 'NaN' WHERE id = 'acme'".into()),
        ("runs.cost_usd NaN", format!("UPDATE pgcrew.runs SET cost_usd = 'NaN' WHERE id = '{run}'")),
        ("runs.cost_usd negative", format!("UPDATE pgcrew.runs SET cost_usd = -1 WHERE id = '{run}'")),
        ("runs.input_tokens", format!("UPDATE pgcrew.runs SET input_tokens = -1 WHERE id = '{run}'")),
        ("runs.output_tokens", format!("UPDATE pgcrew.runs SET output_tokens = -1 WHERE id = '{run}'")),
        ("runs.budget_spent_usd", format!("UPDATE pgcrew.runs SET budget_spent_usd = 'NaN' WHERE id = '{run}'")),
        ("runs.budget_reserved_usd", format!("UPDATE pgcrew.runs SET budget_reserved_usd = 'NaN' WHERE id = '{run}'")),
        ("cost_entries.cost_usd", "INSERT INTO pgcrew.cost_entries (tenant_id, category, cost_usd) VALUES ('acme', 'llm', 'NaN')".into()),
        ("budget_reservations.amount_usd", "INSERT INTO pgcrew.budget_reservations (id, tenant_id, amount_usd) VALUES (gen_random_uuid(), 'acme', 'NaN')".into()),
    ];
    for (what, sql) in &statements {
        let r = conn.batch_execute(sql).await;
        assert!(r.is_err(), "{what} accepted a bad value");
    }
    let (spent, reserved) = money_text(&t.db, &acme).await;
    assert_eq!(
        (spent.as_str(), reserved.as_str()),
        ("0.0000000000", "0.0000000000")
    );
}

/// A database that already holds NaN (written before V012) is repaired by the migration.
#[tokio::test]
async fn migration_repairs_a_database_that_already_holds_nan() {
    mod embedded {
        refinery::embed_migrations!("sql");
    }
    let scratch = pgcrew::db::ScratchDatabase::for_tests().await.unwrap();
    let (mut client, conn) = tokio_postgres::connect(scratch.dsn(), NoTls).await.unwrap();
    let conn_task = tokio::spawn(conn);
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS pgcrew")
        .await
        .unwrap();
    let before_checks = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .filter(|v| *v < 12)
        .max()
        .unwrap();
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name("pgcrew.refinery_schema_history");
    runner
        .set_target(refinery::Target::Version(before_checks))
        .run_async(&mut client)
        .await
        .unwrap();
    // The state NaN settlements left behind (before V012 nothing refused them).
    client
        .batch_execute(
            "INSERT INTO pgcrew.tenants (id, budget_usd_limit) VALUES ('acme', 10), ('fine', 10);
             INSERT INTO pgcrew.runs (id, tenant_id, state, budget_usd_limit)
                  VALUES ('00000000-0000-4000-8000-000000000001', 'acme', 'running', 5);
             INSERT INTO pgcrew.cost_entries (tenant_id, run_id, category, model, prompt_tokens,
                                              completion_tokens, cost_usd)
                  VALUES ('acme', '00000000-0000-4000-8000-000000000001', 'llm', 'm', 10, 20, 0.5),
                         ('acme', '00000000-0000-4000-8000-000000000001', 'llm', 'm', 30, 40, 'NaN'),
                         ('fine', NULL, 'llm', 'm', 1, 1, 0.25);
             INSERT INTO pgcrew.budget_reservations (id, tenant_id, run_id, amount_usd)
                  VALUES ('00000000-0000-4000-8000-0000000000a1', 'acme',
                          '00000000-0000-4000-8000-000000000001', 0.25),
                         ('00000000-0000-4000-8000-0000000000a2', 'acme',
                          '00000000-0000-4000-8000-000000000001', 'NaN');
             UPDATE pgcrew.tenants SET spent_usd = 'NaN', reserved_usd = 'NaN' WHERE id = 'acme';
             UPDATE pgcrew.tenants SET spent_usd = 0.25 WHERE id = 'fine';
             UPDATE pgcrew.runs SET budget_spent_usd = 'NaN', budget_reserved_usd = 'NaN',
                                    cost_usd = 'NaN', input_tokens = -7, output_tokens = 3
              WHERE id = '00000000-0000-4000-8000-000000000001';",
        )
        .await
        .unwrap();
    let status: String = client
        .query_one(
            "SELECT budget_status FROM pgcrew.tenants WHERE id = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status, "EXCEEDED",
        "the NaN tenant is stuck before the repair"
    );
    drop(client);
    conn_task.abort();

    let db = Db::connect(scratch.dsn(), 4, Duration::from_secs(10))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    let conn = db.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT t.spent_usd::text, t.reserved_usd::text, t.budget_status,
                    r.budget_spent_usd::text, r.budget_reserved_usd::text, r.cost_usd::text,
                    r.input_tokens, r.output_tokens,
                    (SELECT count(*) FROM pgcrew.budget_reservations WHERE tenant_id = 'acme'),
                    (SELECT string_agg(cost_usd::text, ',' ORDER BY id) FROM pgcrew.cost_entries
                      WHERE tenant_id = 'acme'),
                    (SELECT spent_usd::text FROM pgcrew.tenants WHERE id = 'fine')
               FROM pgcrew.tenants t, pgcrew.runs r
              WHERE t.id = 'acme' AND r.id = '00000000-0000-4000-8000-000000000001'",
            &[],
        )
        .await
        .unwrap();
    let got: (
        String,
        String,
        String,
        String,
        String,
        String,
        i64,
        i64,
        i64,
        String,
        String,
    ) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
        row.get(6),
        row.get(7),
        row.get(8),
        row.get(9),
        row.get(10),
    );
    assert_eq!(
        got,
        (
            // spent = the valid cost entries (the NaN entry is zeroed).
            "0.5000000000".into(),
            // reserved = the valid open reservation (the NaN one is released).
            "0.2500000000".into(),
            "HEALTHY".into(),
            "0.5000000000".into(),
            "0.2500000000".into(),
            "0.5000000000".into(),
            // Tokens recomputed from the run's cost entries.
            40,
            3,
            1,
            "0.5000000000,0.0000000000".into(),
            // A tenant with valid figures is left alone.
            "0.2500000000".into(),
        )
    );
    // Every repair is logged for the operator.
    let repairs = scalar_on(&conn, "SELECT count(*) FROM pgcrew.money_repairs").await;
    assert!(repairs >= 8, "{repairs} repairs logged");
    // The tenant works again.
    tenancy::reserve(
        &db,
        &ReserveRequest::new(TenantId::new("acme").unwrap(), 1.0),
    )
    .await
    .unwrap();
}
