//! TLS to PostgreSQL (issue 16, part 1): libpq's sslmode semantics against throwaway clusters
//! started with `ssl=on` (their own CA and a server certificate for localhost/127.0.0.1) and
//! with `ssl=off`.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use pgcrew::db::certs::{CertificateAuthority, Validity};
use pgcrew::db::{Db, ScratchDatabase, SslMode, TempCluster, TempClusterOptions, parse_dsn};
use pgcrew::{Client, ClientConfig, Error, EventKind, InstanceId};

use crate::common::{insert_run, next_run_state_change, pgcrew_bin, wait_listening};

/// The role that must log in with a client certificate on the TLS cluster.
const CERT_ROLE: &str = "tls_cert_user";

/// One TLS cluster (with `hostssl all tls_cert_user 127.0.0.1/32 cert`) for this module.
fn tls_cluster() -> &'static TempCluster {
    static C: OnceLock<TempCluster> = OnceLock::new();
    C.get_or_init(|| {
        TempCluster::start_with(TempClusterOptions {
            tls: true,
            tls_cert_auth_roles: vec![CERT_ROLE.into()],
            ..Default::default()
        })
        .expect("start a TLS cluster")
    })
}

/// One cluster with ssl=off.
fn plain_cluster() -> &'static TempCluster {
    static C: OnceLock<TempCluster> = OnceLock::new();
    C.get_or_init(|| TempCluster::start().expect("start a plain cluster"))
}

fn root(c: &TempCluster) -> String {
    c.tls_root_cert()
        .expect("a TLS cluster has a CA")
        .display()
        .to_string()
}

/// Key/value DSN on the cluster's `postgres` database with extra `params`.
fn kv(c: &TempCluster, host: &str, params: &str) -> String {
    format!(
        "host={host} port={} user=postgres password={} dbname=postgres connect_timeout=10 {params}",
        c.port(),
        c.password()
    )
}

fn verify_full_url(c: &TempCluster) -> String {
    format!("{}?sslmode=verify-full&sslrootcert={}", c.dsn(), root(c))
}

/// Whether the backend of a connection made with `dsn` is encrypted (`pg_stat_ssl`).
async fn backend_ssl(dsn: &str) -> pgcrew::Result<bool> {
    let (client, conn) = parse_dsn(dsn)?.open().await?;
    let driver = tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    drop(client);
    let _ = driver.await;
    Ok(row.get(0))
}

/// The row `sql` returns on a connection of a new pool to `dsn`.
async fn query_on_new_pool(dsn: &str, sql: &str) -> tokio_postgres::Row {
    let db = Db::connect(dsn, 2, Duration::from_secs(10)).await.unwrap();
    db.get().await.unwrap().query_one(sql, &[]).await.unwrap()
}

/// Connecting with `dsn` fails (see [`connect_err`]) with an error containing each of `says`;
/// `context` starts the failure message.
async fn assert_connect_fails(dsn: &str, says: &[&str], context: &str) {
    let e = connect_err(dsn).await;
    for part in says {
        assert!(e.contains(part), "{context}{e}");
    }
}

/// Connect a pool (which opens and checks one connection) and give the error text, failing
/// the test if it hangs.
async fn connect_err(dsn: &str) -> String {
    match tokio::time::timeout(
        Duration::from_secs(60),
        Db::connect(dsn, 2, Duration::from_secs(10)),
    )
    .await
    .expect("connecting must not hang")
    {
        Ok(_) => panic!("connecting with {} succeeded", pgcrew::db::redact_dsn(dsn)),
        Err(e) => e.to_string(),
    }
}

fn write_pem(dir: &Path, name: &str, pem: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p.display().to_string()
}

/// A new certificate authority named `name`, its root certificate written to `file` in a
/// fresh [`temp_dir`]: (the directory, the authority, the certificate file's path).
fn ca_file_in_temp_dir(
    name: &str,
    file: &str,
) -> (std::path::PathBuf, CertificateAuthority, String) {
    let dir = temp_dir();
    let ca = CertificateAuthority::new(name).unwrap();
    let ca_file = write_pem(&dir, file, ca.cert_pem());
    (dir, ca, ca_file)
}

fn temp_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pgcrew-tls-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&d).unwrap();
    d
}

#[tokio::test]
async fn verify_full_pool_sibling_and_listen_are_encrypted() {
    let c = tls_cluster();
    let scratch = ScratchDatabase::create(&verify_full_url(c), "pgcrew_tls")
        .await
        .unwrap();
    // The scratch database's DSN keeps the TLS settings.
    assert_eq!(
        parse_dsn(scratch.dsn()).unwrap().ssl_mode(),
        SslMode::VerifyFull
    );
    let mut config = ClientConfig::builder()
        .instance_id(InstanceId::new("tls-listener").unwrap())
        .build()
        .unwrap();
    config.migrate = true;
    let client = Client::builder(scratch.dsn())
        .config(config)
        .build()
        .await
        .unwrap();
    client.start().await.unwrap();
    wait_listening(&client, Duration::from_secs(20)).await;
    let mut sub = client.subscribe(&[EventKind::RunStateChanged]);
    let db = client.db().clone();
    let conn = db.get().await.unwrap();
    let run_id = insert_run(&db).await;
    let r = next_run_state_change(
        &mut sub,
        Duration::from_secs(10),
        "a notification over the TLS LISTEN connection",
    )
    .await;
    assert_eq!(r.0, run_id);
    // Every backend of this database (pool, and the coordination connection that is also the
    // LISTEN connection) is encrypted.
    let rows = conn
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    assert!(rows.len() >= 2, "{} backends", rows.len());
    assert!(
        rows.iter().all(|r| r.get::<_, bool>(1)),
        "unencrypted backend"
    );
    assert!(
        rows.iter()
            .any(|r| r.get::<_, String>(0).ends_with("coordination") && r.get::<_, bool>(1)),
        "no encrypted LISTEN backend"
    );
    drop(conn);
    client.stop().await.unwrap();
}

#[tokio::test]
async fn wrong_host_name_fails_naming_host_and_reason() {
    let c = tls_cluster();
    let r = root(c);
    // The certificate is for localhost and 127.0.0.1, not for `db.wrong.example`.
    let dsn = kv(
        c,
        "db.wrong.example",
        &format!("hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={r}"),
    );
    assert_connect_fails(
        &dsn,
        &["db.wrong.example", "name mismatch", "verify-full"],
        "",
    )
    .await;
    // verify-ca checks the chain only.
    let dsn = kv(
        c,
        "db.wrong.example",
        &format!("hostaddr=127.0.0.1 sslmode=verify-ca sslrootcert={r}"),
    );
    assert!(backend_ssl(&dsn).await.unwrap());
    // Both names in the certificate pass verify-full.
    for host in ["localhost", "127.0.0.1"] {
        let dsn = kv(c, host, &format!("sslmode=verify-full sslrootcert={r}"));
        assert!(backend_ssl(&dsn).await.unwrap(), "{host}");
    }
}

#[tokio::test]
async fn unknown_ca_fails_and_require_follows_libpq() {
    let c = tls_cluster();
    let (dir, _other, other_root) = ca_file_in_temp_dir("some other CA", "other.crt");
    for mode in ["verify-full", "verify-ca", "require"] {
        let dsn = kv(
            c,
            "127.0.0.1",
            &format!("sslmode={mode} sslrootcert={other_root}"),
        );
        let says = ["127.0.0.1", "unknown CA", &other_root];
        assert_connect_fails(&dsn, &says, &format!("{mode}: ")).await;
    }
    // `require` without a CA encrypts without verifying (libpq), so it connects.
    assert!(
        backend_ssl(&kv(c, "127.0.0.1", "sslmode=require"))
            .await
            .unwrap()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn expired_server_certificate_is_named() {
    let c = tokio::task::spawn_blocking(|| {
        TempCluster::start_with(TempClusterOptions {
            tls: true,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let (dir, ca, ca_file) = ca_file_in_temp_dir("expiry CA", "ca.crt");
    let expired = ca
        .issue_server(&["localhost", "127.0.0.1"], Validity::Expired)
        .unwrap();
    c.replace_server_cert(&expired).unwrap();
    let dsn = kv(
        &c,
        "127.0.0.1",
        &format!("sslmode=verify-full sslrootcert={ca_file}"),
    );
    // The reload is asynchronous: wait until the server presents the new certificate.
    let mut last = String::new();
    for _ in 0..100 {
        last = connect_err(&dsn).await;
        if !last.contains("unknown CA") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last.contains("expired"), "{last}");
    assert!(last.contains("127.0.0.1"), "{last}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn require_and_verify_against_a_server_without_tls_fail_at_once() {
    let c = plain_cluster();
    let (dir, _unused, ca_file) = ca_file_in_temp_dir("unused CA", "ca.crt");
    for params in [
        "sslmode=require".to_string(),
        format!("sslmode=verify-ca sslrootcert={ca_file}"),
        format!("sslmode=verify-full sslrootcert={ca_file}"),
    ] {
        let dsn = kv(c, "127.0.0.1", &params);
        let says = ["does not support TLS", "127.0.0.1"];
        assert_connect_fails(&dsn, &says, &format!("{params}: ")).await;
    }
    // The LISTEN / dedicated path says the same.
    let cfg = parse_dsn(&kv(c, "127.0.0.1", "sslmode=require")).unwrap();
    let e = cfg.open().await.map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    assert!(e.to_string().contains("does not support TLS"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn prefer_is_the_default_and_uses_tls_only_when_offered() {
    let tls = tls_cluster();
    let plain = plain_cluster();
    assert_eq!(parse_dsn(&tls.dsn()).unwrap().ssl_mode(), SslMode::Prefer);
    assert!(backend_ssl(&tls.dsn()).await.unwrap());
    assert!(!backend_ssl(&plain.dsn()).await.unwrap());
    assert!(
        !backend_ssl(&format!("{}?sslmode=disable", tls.dsn()))
            .await
            .unwrap()
    );
    // `allow` tries plaintext first: the TLS server accepts it.
    assert!(
        !backend_ssl(&format!("{}?sslmode=allow", tls.dsn()))
            .await
            .unwrap()
    );
    // A pool made with the default mode is encrypted on the TLS server.
    let row = query_on_new_pool(
        &tls.dsn(),
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await;
    assert!(row.get::<_, bool>(0));
}

#[tokio::test]
async fn allow_falls_back_to_tls_when_the_server_refuses_plaintext() {
    let c = tls_cluster();
    // The certificate role may only log in over TLS (hostssl): `allow` must retry with TLS.
    let (cert, key) = c.issue_client_cert(CERT_ROLE).unwrap();
    create_cert_role(c).await;
    let dsn = format!(
        "host=127.0.0.1 port={} user={CERT_ROLE} dbname=postgres sslmode=allow sslcert={} sslkey={}",
        c.port(),
        cert.display(),
        key.display()
    );
    assert!(backend_ssl(&dsn).await.unwrap());
    // Against a server without TLS, `allow` reports the server's own refusal.
    let plain = plain_cluster();
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres password=wrong dbname=postgres sslmode=allow",
        plain.port()
    );
    let e = connect_err(&dsn).await;
    assert!(e.contains("password authentication failed"), "{e}");
}

async fn create_cert_role(c: &TempCluster) {
    let (client, conn) = parse_dsn(&c.dsn()).unwrap().open().await.unwrap();
    let driver = tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {CERT_ROLE} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))
        .await
        .unwrap();
    drop(client);
    let _ = driver.await;
}

#[tokio::test]
async fn client_certificate_authentication() {
    let c = tls_cluster();
    create_cert_role(c).await;
    let (cert, key) = c.issue_client_cert(CERT_ROLE).unwrap();
    let r = root(c);
    let with_cert = format!(
        "postgres://{CERT_ROLE}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={r}&sslcert={}&sslkey={}",
        c.port(),
        cert.display(),
        key.display()
    );
    let row = query_on_new_pool(&with_cert, "SELECT current_user::text, s.ssl, s.client_dn FROM pg_stat_ssl s WHERE pid = pg_backend_pid()").await;
    assert_eq!(row.get::<_, String>(0), CERT_ROLE);
    assert!(row.get::<_, bool>(1));
    assert!(
        row.get::<_, Option<String>>(2)
            .unwrap_or_default()
            .contains(CERT_ROLE)
    );
    // Without a client certificate the server refuses the role.
    let without = format!(
        "postgres://{CERT_ROLE}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={r}",
        c.port()
    );
    let e = connect_err(&without).await;
    assert!(e.contains("certificate"), "{e}");
    // A certificate for another role does not log in as this one.
    let (other_cert, other_key) = c.issue_client_cert("someone_else").unwrap();
    let wrong = format!(
        "postgres://{CERT_ROLE}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={r}&sslcert={}&sslkey={}",
        c.port(),
        other_cert.display(),
        other_key.display()
    );
    let e = connect_err(&wrong).await;
    assert!(e.contains("authentication failed"), "{e}");
}

#[tokio::test]
async fn bad_tls_input_is_a_clear_error_before_connecting() {
    let dir = temp_dir();
    let garbage = write_pem(&dir, "garbage.crt", "this is not PEM\n");
    let ca = CertificateAuthority::new("input CA").unwrap();
    let ca_file = write_pem(&dir, "ca.crt", ca.cert_pem());
    let client = ca.issue_client("someone").unwrap();
    let cert_file = write_pem(&dir, "c.crt", &client.cert_pem);
    // Nothing listens on port 1: every error below comes from the DSN, not the network.
    let cases: Vec<(String, &str)> = vec![
        (
            "sslmode=verify-fulll".into(),
            "sslmode `verify-fulll` is not one of",
        ),
        ("sslmode=VERIFY-FULL".into(), "is not one of"),
        (
            "sslmode=verify-full sslrootcert=/nonexistent/ca.crt".into(),
            "cannot read sslrootcert=/nonexistent/ca.crt",
        ),
        (
            format!("sslmode=verify-full sslrootcert={garbage}"),
            "it holds no certificate",
        ),
        ("sslmode=verify-full".into(), "no CA is given"),
        (
            format!("sslkey={ca_file}"),
            "sslkey is set but sslcert is not",
        ),
        (
            format!("sslcert={cert_file}"),
            "sslcert is set but sslkey is not",
        ),
        (
            format!("sslcert={cert_file} sslkey=/nonexistent/c.key"),
            "cannot read the client key sslkey=/nonexistent/c.key",
        ),
        (
            format!("sslcert={cert_file} sslkey={garbage}"),
            "cannot read the client key",
        ),
        (
            "sslrootcert=system sslmode=verify-ca".into(),
            "needs sslmode=verify-full",
        ),
    ];
    for (params, needle) in &cases {
        for dsn in [
            format!("host=127.0.0.1 port=1 user=u dbname=d {params}"),
            format!(
                "postgres://u@127.0.0.1:1/d?{}",
                params.split(' ').collect::<Vec<_>>().join("&")
            ),
        ] {
            let e = parse_dsn(&dsn).map(|_| ()).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{dsn}: {e:?}");
            assert!(e.to_string().contains(needle), "{dsn}: {e}");
            let e = connect_err(&dsn).await;
            assert!(e.contains(needle), "{dsn}: {e}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn cli_rejects_bad_tls_settings_with_exit_2() {
    for (dsn, needle) in [
        (
            "postgres://u@127.0.0.1:1/d?sslmode=bogus",
            "sslmode `bogus` is not one of disable, allow, prefer, require, verify-ca, verify-full",
        ),
        (
            "host=127.0.0.1 port=1 sslmode=verify-full sslrootcert=/nonexistent/root.crt",
            "cannot read sslrootcert=/nonexistent/root.crt",
        ),
    ] {
        let out = tokio::process::Command::new(pgcrew_bin())
            .arg("instances")
            .env("DATABASE_URL", dsn)
            .env_remove("PGCREW_TEST_DATABASE_URL")
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{dsn}: {err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_default();
        assert!(line.contains(needle), "{dsn}: {err}");
    }
    // And over TLS the CLI works.
    let c = tls_cluster();
    let out = tokio::process::Command::new(pgcrew_bin())
        .arg("migrate")
        .env("DATABASE_URL", verify_full_url(c))
        .env_remove("PGCREW_TEST_DATABASE_URL")
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
