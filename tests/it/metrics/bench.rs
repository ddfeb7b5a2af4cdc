//! `pgcrew bench observability` runs end to end on a small load.

use crate::common::run_bench;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_observability_measures_both_sides_exports_spans_and_times_scrapes() {
    let (_t, report, stderr) = run_bench(
        "observability --rounds 1 --tasks 300 --concurrency 2 --queues 10 --tenants 50 --scrapes 3",
    )
    .await;
    for side in [
        "off_processed_per_sec",
        "metrics_processed_per_sec",
        "on_processed_per_sec",
    ] {
        let v = report[side].as_array().unwrap();
        assert_eq!(v.len(), 1, "{side}: {report}");
        assert!(v[0].as_f64().unwrap() > 0.0, "{side}: {report}");
    }
    // Spans were exported only from the traced run: at least one task span per task.
    assert!(
        report["spans_exported"].as_u64().unwrap() >= 300,
        "{report}\n{stderr}"
    );
    assert_eq!(report["spans_dropped"].as_u64(), Some(0), "{report}");
    // 10 queues x 2 states, 50 tenants x 2 budget series (plus the default tenant's status).
    assert!(
        report["scrape_series"].as_u64().unwrap() >= 20 + 100,
        "{report}"
    );
    assert!(report["scrape_p50_ms"].as_f64().unwrap() > 0.0);
}
