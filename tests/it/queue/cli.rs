//! The `pgcrew tasks` and `pgcrew bench` command lines.

use crate::common::{assert_bench_database_dropped, pgcrew_bin, run_bench, test_db};

#[tokio::test]
async fn cli_tasks_enqueue_stats_list_cancel_retry_discard() {
    let t = test_db().await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(pgcrew_bin())
            .args(args)
            .env("DATABASE_URL", t.dsn())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&["tasks", "enqueue", "--kind", "mail", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["id"].as_i64().unwrap().to_string();
    let (code, _, _) = run(&["tasks", "enqueue", "--kind", "mail", "--count", "3"]);
    assert_eq!(code, Some(0));
    let (code, out, _) = run(&["tasks", "stats", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["queue"], "default");
    assert_eq!(v[0]["state"], "available");
    assert_eq!(v[0]["tasks"], 4);
    let (code, out, _) = run(&["tasks", "cancel", &id]);
    assert_eq!(code, Some(0));
    assert!(out.contains("cancelled"), "{out}");
    let (code, out, _) = run(&["tasks", "list", "--state", "cancelled", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["id"].to_string(), id);
    let (code, out, _) = run(&["tasks", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("ID"), "{out}");
    let (code, out, _) = run(&["tasks", "retry", &id, "--json"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("available"), "{out}");
    let (code, _, err) = run(&["tasks", "list", "--state", "bogus"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not a task state"), "{err}");
    let (code, _, err) = run(&["tasks", "cancel", "999999"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = run(&["tasks", "enqueue", "--kind", "k", "--payload", "{oops"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not valid JSON"), "{err}");
    // Discard (V033): the available task is discarded with the reason; a second discard of
    // the now finished task is refused and changes nothing.
    let (code, out, err) = run(&["tasks", "discard", &id, "--reason", "bad input", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("discarded"), "{out}");
    let (code, out, _) = run(&["tasks", "list", "--state", "discarded", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["id"].to_string(), id);
    assert_eq!(v[0]["last_error"], "bad input");
    let (code, _, err) = run(&["tasks", "discard", &id]);
    assert_ne!(code, Some(0));
    assert!(err.contains("discarded -> discarded"), "{err}");
}

/// `pgcrew bench queue` runs end to end in its own scratch databases (small sizes, two
/// rounds), reports every figure of every round and their medians, including the plain-SQL
/// claim+complete limit, the wake-up floor, the ratios and the instance's memory, and drops
/// its databases afterwards.
#[tokio::test]
async fn cli_bench_queue_reports_every_figure_and_cleans_up() {
    let (t, v, stderr) = run_bench(
        "queue --tasks 300 --batch 100 --wakeups 5 --wakeup-gap 1ms --rounds 2 --raw-batch 7",
    )
    .await;
    assert_eq!(v["tasks"], 300);
    assert_eq!(v["rounds"], 2);
    assert_eq!(v["raw_batch"], 7);
    assert_eq!(v["raw_connections"], 4, "instances x concurrency");
    let rounds = v["per_round"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    let positive = [
        "enqueue_per_sec",
        "processed_per_sec",
        "raw_processed_per_sec",
        "processed_ratio",
        "wakeup_p50_ms",
        "wakeup_p99_ms",
        "wakeup_after_burst_p50_ms",
        "raw_wakeup_p50_ms",
        "raw_wakeup_p99_ms",
    ];
    for round in rounds {
        assert_eq!(round["wakeup_samples"], 5);
        // 300 tasks: fewer than one look at the table's vacuum (every 5,000 acknowledgements).
        assert_eq!(round["vacuums"], 0, "{round}");
        for field in positive {
            let x = round[field].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite() && x > 0.0, "{field} = {:?}", round[field]);
        }
        for field in ["idle_mib", "load_mib", "after_mib"] {
            let x = round["memory"][field].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite() && x > 0.0, "memory.{field} = {round}");
        }
    }
    for field in positive.iter().chain(&[
        "wakeup_p50_ratio",
        "wakeup_p99_ratio",
        "rss_idle_mib",
        "rss_load_mib",
    ]) {
        let x = v[field].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x > 0.0, "{field} = {:?}", v[field]);
    }
    // Measured from the enqueue call's return: on a loaded machine the handler can start before
    // the client has read the enqueue's reply, which counts as 0.
    for field in ["wakeup_from_commit_p50_ms", "raw_wakeup_from_commit_p50_ms"] {
        let x = v[field].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x >= 0.0, "{field} = {:?}", v[field]);
    }
    // Every round's database is dropped.
    let named: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("benchmark database: "))
        .collect();
    assert_eq!(named.len(), 2, "{stderr}");
    for line in named {
        assert_bench_database_dropped(&t, line).await;
    }
}

/// `pgcrew bench queue --retained N --pool-vacuum false` writes the N finished tasks before the
/// round, runs with the pools' vacuum off, says both in its report, and drops its database.
#[tokio::test]
async fn cli_bench_queue_with_retained_tasks_and_no_pool_vacuum() {
    let (t, v, stderr) = run_bench(
        "queue --tasks 200 --batch 100 --wakeups 3 --wakeup-gap 1ms --rounds 1 --retained 700 --pool-vacuum false",
    )
    .await;
    assert_eq!(v["retained"], 700, "{v}");
    assert_eq!(v["pool_vacuum"], false, "{v}");
    let round = &v["per_round"][0];
    assert_eq!(round["retained"], 700, "{round}");
    assert_eq!(round["pool_vacuum"], false, "{round}");
    assert_eq!(round["vacuums"], 0, "{round}");
    let x = round["processed_per_sec"].as_f64().unwrap_or(f64::NAN);
    assert!(x.is_finite() && x > 0.0, "{round}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("benchmark database: "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert_bench_database_dropped(&t, line).await;
}

/// `pgcrew bench scale` runs end to end in its own scratch database (small sizes): the table
/// grows phase by phase as asked, every claim is measured, the late tenant's single task is
/// claimed within one claim cycle, and the database is dropped afterwards.
#[tokio::test]
async fn cli_bench_scale_grows_the_table_and_reports_fairness() {
    let (t, v, stderr) =
        run_bench("scale --finished 3000 --backlog 4000 --samples 20 --batch 6").await;
    // Each phase enqueues 20 x 6 tasks for each of two tenants and claims 20 x 6 of them.
    let rows = |p: &str| v[p]["table_rows"].as_i64().unwrap();
    let available = |p: &str| v[p]["available"].as_i64().unwrap();
    assert_eq!(rows("only_measured"), 240);
    assert_eq!(available("only_measured"), 240);
    assert_eq!(rows("with_finished"), 240 + 3000 + 240);
    assert_eq!(available("with_finished"), 120 + 240);
    assert_eq!(rows("with_backlog"), 240 + 3000 + 240 + 4000 + 240);
    assert_eq!(available("with_backlog"), 240 + 4000 + 240);
    for p in ["only_measured", "with_finished", "with_backlog"] {
        for f in ["claim_p50_ms", "claim_p99_ms", "ack_p50_ms"] {
            let x = v[p][f].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite() && x > 0.0, "{p}.{f} = {:?}", v[p][f]);
        }
    }
    // Big (backlog), small (leftovers) and late.
    assert_eq!(v["tenants_with_work"], 3);
    assert_eq!(v["fair_claims_batch"], 1);
    let single = v["fair_claims_single"].as_i64().unwrap();
    assert!((1..=3).contains(&single), "claims of 1: {single}");
    assert_bench_database_dropped(&t, &stderr).await;
}
