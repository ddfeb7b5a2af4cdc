//! Smoke tests of `pgcrew bench scale-out` and `pgcrew bench soak` at small sizes (issue #22):
//! every figure is reported and the scratch databases are dropped. Speed is not asserted.

use crate::common::{assert_bench_database_dropped, run_bench, scalar};

#[tokio::test]
async fn scale_out_reports_every_figure_and_drops_its_databases() {
    let (t, report, stderr) = run_bench(
        "scale-out --instances 1,2 --tasks 300 --wakeups 5 --idle-window 2s --heartbeat-interval 500ms",
    )
    .await;
    assert!(
        report["coordination_source"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{report}"
    );
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{report}");
    for (row, n) in rows.iter().zip([1, 2]) {
        assert_eq!(row["instances"], n, "{row}");
        for f in [
            "tasks_per_s",
            "vs_first",
            "wakeup_p50_ms",
            "wakeup_p99_ms",
            // The plain-SQL floor, measured beside pgcrew with the same instances idle.
            "floor_wakeup_p50_ms",
            "floor_wakeup_p99_ms",
            "floor_wakeup_seen_p50_ms",
            "floor_wakeup_seen_p99_ms",
            "coordination_per_s",
            "coordination_per_instance_interval",
            "claim_p50_ms",
            "claim_p99_ms",
        ] {
            assert!(row[f].as_f64().is_some_and(|v| v > 0.0), "{f}: {row}");
        }
        assert!(row["connections"].as_i64().is_some_and(|c| c >= n), "{row}");
        // The claim probe timed claims while the instances processed the tasks.
        assert!(row["claim_samples"].as_u64() >= Some(1), "{row}");
        // Claim figures come from pg_stat_statements: present exactly when it is the source.
        let pgss = report["coordination_source"] == "pg_stat_statements";
        assert_eq!(row["claim_max_ms"].is_number(), pgss, "{row}");
        assert_eq!(
            row["instance_part_per_instance_interval"].is_number(),
            pgss,
            "{row}"
        );
        // Claims per wake-up sample (the thundering herd's size), with pg_stat_statements.
        assert_eq!(row["wakeup_claims_per_sample"].is_number(), pgss, "{row}");
    }
    assert!(
        rows[0]["failover_ms"].is_null(),
        "no failover with one instance"
    );
    assert!(
        rows[1]["failover_ms"].as_f64().is_some_and(|v| v > 0.0),
        "{report}"
    );
    // One scratch database per instance count, each dropped.
    let names: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("benchmark database: "))
        .collect();
    assert_eq!(names.len(), 2, "{stderr}");
    for name in names {
        let q = format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{}'",
            name.trim()
        );
        assert_eq!(scalar(&t.db, &q).await, 0, "{name} left behind");
    }
}

#[tokio::test]
async fn soak_reports_the_curve_and_loses_nothing() {
    let (t, report, stderr) = run_bench(
        "soak --duration 8s --instances 2 --tasks-per-s 50 --runs-per-s 1 --kill-every 4s --sample-every 2s --retention 2s --run-row-retention 1s",
    )
    .await;
    let samples = report["samples"].as_array().expect("samples");
    assert!(samples.len() >= 4, "{report}");
    let last = samples.last().unwrap();
    for f in ["tasks_per_s", "tables_mib", "indexes_mib"] {
        assert!(last[f].as_f64().is_some_and(|v| v > 0.0), "{f}: {last}");
    }
    assert!(last["dead_tuples"].is_i64(), "{last}");
    // Each live instance's RSS, by instance id.
    assert!(
        last["rss_mib"].as_array().is_some_and(|r| r.len() == 2
            && r.iter()
                .all(|m| m[0].as_str().is_some() && m[1].as_f64() > Some(0.0))),
        "{last}"
    );
    assert!(report["leader_kills"].as_u64() >= Some(1), "{report}");
    assert!(report["tasks_enqueued"].as_u64() > Some(0), "{report}");
    assert_eq!(report["tasks_lost"], 0, "{report}");
    assert_eq!(report["runs_unfinished"], 0, "{report}");
    assert!(report["runs_submitted"].as_u64() > Some(0), "{report}");
    assert_eq!(report["ledgers_invalid"], 0, "{report}");
    // Every run's ledger verified, but those whose rows run row retention deleted.
    assert_eq!(
        report["ledgers_verified"].as_u64().unwrap() + report["runs_deleted"].as_u64().unwrap(),
        report["runs_submitted"].as_u64().unwrap(),
        "{report}"
    );
    for f in ["rss_growth_pct", "size_growth_pct"] {
        assert!(report[f].is_number(), "{f}: {report}");
    }
    assert_bench_database_dropped(&t.db, &stderr).await;
}
