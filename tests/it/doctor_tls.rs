//! `pgcrew doctor` on a healthy deployment over TLS: every check passes, the TLS check
//! included (library and CLI, text and JSON).
//!
//! Needs the TLS support of issue #16 (`TempClusterOptions::tls`, `TempCluster::tls_root_cert`,
//! `sslmode` / `sslrootcert` in DSNs): registered in tests/it/main.rs once that has landed.

use std::time::Duration;

use pgcrew::db::{Db, TempClusterOptions};
use pgcrew::doctor::{self, CheckId, Status};

use crate::common::{healthy_deployment, own_cluster};
use crate::doctor::{deployment_cli, finding, json_statuses};

#[tokio::test]
async fn healthy_deployment_over_tls_passes_every_check() {
    let (cluster, plain_dsn) = own_cluster(TempClusterOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    let root = cluster
        .tls_root_cert()
        .expect("a TLS cluster has a root certificate")
        .display()
        .to_string();
    let dsn = format!("{plain_dsn}?sslmode=verify-full&sslrootcert={root}");
    let d = healthy_deployment(&dsn).await;

    let doctor_db = Db::connect(&dsn, 1, Duration::from_secs(10)).await.unwrap();
    let report = doctor::run(&doctor_db, &d.doctor_options()).await.unwrap();
    assert_eq!(report.findings.len(), CheckId::ALL.len());
    for f in &report.findings {
        assert_eq!(f.status, Status::Pass, "{f:#?}");
        assert!(f.advice.is_none(), "{f:#?}");
    }
    assert!(!report.failed());
    let tls = finding(&report, CheckId::Tls);
    assert!(tls.message.contains("use TLS (TLSv1."), "{tls:#?}");
    assert!(
        tls.message.contains("this doctor's connection: TLS"),
        "{tls:#?}"
    );

    // The CLI agrees and exits 0.
    let (out, text_out) = deployment_cli(&d, &dsn).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let statuses = json_statuses(&out);
    assert_eq!(statuses.len(), CheckId::ALL.len());
    assert!(statuses.values().all(|s| s == "pass"), "{statuses:?}");
    let out = text_out;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for check in CheckId::ALL {
        assert!(text.contains(&format!("PASS  {check}")), "{check}: {text}");
    }
    assert!(text.contains("16 passed, 0 warning(s), 0 failed"), "{text}");
    d.stop().await;
}
