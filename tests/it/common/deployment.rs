//! A deployment set up the way the production checklist asks (doctor tests).

use std::time::Duration;

use pgcrew::db::Db;

use super::wait_until;

/// The ledger key text of [`healthy_deployment`] (also what `PGCREW_LEDGER_KEY` holds for it).
pub const DEPLOYMENT_LEDGER_KEY: &str = "doctor-test-ledger-key-0123456789abcdef";

/// A deployment set up the way the production checklist asks (see [`healthy_deployment`]).
pub struct Deployment {
    /// A pool on the database (its connections are pgcrew's, too).
    pub db: Db,
    /// The running instances (stop them with [`Deployment::stop`]).
    pub clients: Vec<pgcrew::Client>,
    /// The configuration the instances run with.
    pub config: pgcrew::ClientConfig,
    /// The ledger key they sign with.
    pub key: pgcrew::LedgerKey,
    /// The run completed (and signed) by an instance.
    pub completed_run: pgcrew::RunId,
}

impl Deployment {
    /// `pgcrew doctor`'s options matching the instances' configuration, with the key.
    pub fn doctor_options(&self) -> pgcrew::doctor::DoctorOptions {
        pgcrew::doctor::DoctorOptions {
            ledger_key: Some(self.key.clone()),
            ..pgcrew::doctor::DoctorOptions::for_client_config(&self.config)
        }
    }

    /// Stop every instance.
    pub async fn stop(self) {
        for c in &self.clients {
            c.stop().await.expect("stop instance");
        }
    }
}

/// A pgcrew deployment on `dsn` as the production checklist wants it: migrated, two instances
/// heartbeating with one leading and signing with the ledger key, a tenant with a budget and a
/// bound read-only role (pg_locks revoked from PUBLIC), a run finished and signed, a task
/// waiting briefly, and `idle_in_transaction_session_timeout` set for the database. The caller
/// is a superuser (throwaway clusters' `postgres`).
pub async fn healthy_deployment(dsn: &str) -> Deployment {
    use pgcrew::runs::{self, LimitPolicy, NewRun, RunOutcome, StartOutcome};
    use pgcrew::{Client, ClientConfig, InstanceId, LedgerKey, NewTask, TenantContext, TenantId};

    let db = Db::connect(dsn, 4, Duration::from_secs(10))
        .await
        .expect("connect");
    db.migrate().await.expect("migrate");
    db.get()
        .await
        .expect("connection")
        .batch_execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET idle_in_transaction_session_timeout = %L', current_database(), '60s'); END $$;
             REVOKE SELECT ON pg_catalog.pg_locks FROM PUBLIC;
             CREATE ROLE doctor_acme_reader LOGIN PASSWORD 'doctor-test-only';",
        )
        .await
        .expect("configure the database");
    let key = LedgerKey::new(DEPLOYMENT_LEDGER_KEY).expect("ledger key");
    let config = ClientConfig::builder()
        .heartbeat_interval(Duration::from_millis(200))
        .instance_ttl(Duration::from_secs(5))
        .leader_ttl(Duration::from_secs(2))
        .maintenance_interval(Duration::from_millis(500))
        .pool_size(2)
        .ledger_key(key.clone())
        .build()
        .expect("config");
    let mut clients = Vec::new();
    for id in ["doctor-a", "doctor-b"] {
        let mut c = config.clone();
        c.instance_id = InstanceId::new(id).expect("instance id");
        let client = Client::connect(dsn, c).await.expect("instance connects");
        client.start().await.expect("instance starts");
        clients.push(client);
    }
    wait_until(Duration::from_secs(10), "an instance leads", || async {
        clients.iter().any(|c| c.is_leader())
    })
    .await;
    let acme = TenantId::new("acme").expect("tenant id");
    pgcrew::tenancy::upsert(
        &db,
        &TenantContext::for_id(acme.clone()).budget_usd(Some(100.0)),
    )
    .await
    .expect("tenant with a budget");
    pgcrew::tenancy::grant_tenant_role(&db, "doctor_acme_reader", &acme)
        .await
        .expect("bind the reader role");
    // A run finished by an instance (its handle holds the ledger key, so the head is signed).
    let instance_db = clients[0].db();
    let run = runs::create_run(instance_db, NewRun::new(acme.clone()))
        .await
        .expect("create run");
    let started = runs::start_run(
        instance_db,
        run,
        Some(clients[0].instance_id()),
        None,
        LimitPolicy::default(),
    )
    .await
    .expect("start run");
    assert!(matches!(started, StartOutcome::Started(_)));
    runs::complete_run(instance_db, run, RunOutcome::default(), None)
        .await
        .expect("complete run");
    // A task waiting (nobody works queue `doctor`), well within the lag threshold.
    clients[0]
        .enqueue(
            &NewTask::new("doctor.noop", &serde_json::json!({}))
                .expect("task")
                .queue("doctor")
                .tenant(acme),
        )
        .await
        .expect("enqueue");
    Deployment {
        db,
        clients,
        config,
        key,
        completed_run: run,
    }
}
