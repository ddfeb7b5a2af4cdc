//! Smoke tests of `pgcrew bench agents`, `fanout` and `pgbouncer` at small sizes: they run end
//! to end in their own scratch database, report every figure, and drop the database. No timed
//! assertions.

use crate::common::{assert_bench_database_dropped, run_bench};

/// A figure that must be a positive number.
fn positive(v: &serde_json::Value, field: &str) -> f64 {
    let x = v[field].as_f64().unwrap_or(f64::NAN);
    assert!(x.is_finite() && x > 0.0, "{field} = {:?} in {v}", v[field]);
    x
}

/// `pgcrew bench agents` measures both agents at 1 and 2 instances: every run completes, and
/// each phase reports runs/s, statements per run by kind (the run's own statements among
/// them), commits per run, CPU, the bound and the instance's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_agents_reports_runs_statements_and_bound() {
    let (t, v, stderr) =
        run_bench("agents --runs 12 --counted-runs 6 --instances 1,2 --concurrency 2").await;
    let phases = v["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 4, "{v}");
    let from = v["statements_from"].as_str().unwrap();
    assert!(from == "proxy" || from == "pg_stat_statements", "{from}");
    for (p, (agent, instances)) in phases.iter().zip([
        ("bench_answer", 1),
        ("bench_tool", 1),
        ("bench_answer", 2),
        ("bench_tool", 2),
    ]) {
        assert_eq!(p["agent"], agent, "{p}");
        assert_eq!(p["instances"], instances, "{p}");
        assert_eq!(p["runs"], 12, "{p}");
        assert_eq!(p["runs_not_completed"], 0, "{p}\n{stderr}");
        for f in [
            "runs_per_sec",
            "statements_per_run",
            "commits_per_run",
            "instance_cpu_ms_per_run",
        ] {
            positive(p, f);
        }
        if from == "proxy" {
            positive(p, "round_trips_per_run");
        }
        let kinds = p["statements_by_kind"].as_array().unwrap();
        assert!(!kinds.is_empty(), "{p}");
        // The run is submitted before the phase and finished in it.
        assert!(
            kinds
                .iter()
                .any(|k| k["kind"].as_str().is_some_and(|k| k.contains("pgcrew."))),
            "{p}"
        );
        assert!(!p["bound"].as_str().unwrap().is_empty(), "{p}");
        for f in ["idle_mib", "load_mib", "after_mib"] {
            positive(&p["memory"], f);
        }
    }
    assert_bench_database_dropped(&t, &stderr).await;
}

/// `pgcrew bench fanout` delivers every notification to every subscriber in every round and
/// reports the latencies beside a raw LISTEN's, their ratios (medians of the rounds, and each
/// round's) and the instance's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_fanout_reports_every_figure() {
    let (t, v, stderr) =
        run_bench("fanout --subscribers 20 --notifications 10 --raw-samples 30 --rounds 2").await;
    assert_eq!(v["deliveries"], 400, "{v}");
    assert_eq!(v["raw_samples"], 60, "{v}");
    assert_eq!(v["rounds"], 2, "{v}");
    let rounds = v["per_round"].as_array().expect("per_round");
    assert_eq!(rounds.len(), 2, "{v}");
    let fields = [
        "p50_us",
        "p99_us",
        "raw_p50_us",
        "raw_p99_us",
        "p50_ratio",
        "p99_ratio",
    ];
    for round in rounds {
        assert_eq!(round["deliveries"], 200, "{round}");
        assert_eq!(round["raw_samples"], 30, "{round}");
        for f in fields {
            positive(round, f);
        }
    }
    for f in fields {
        positive(&v, f);
    }
    for f in ["idle_mib", "load_mib", "after_mib"] {
        positive(&v["memory"], f);
    }
    assert_bench_database_dropped(&t, &stderr).await;
}

/// `pgcrew bench pgbouncer` runs `bench queue` direct (cached and unnamed statements) and
/// through PgBouncer, `--rounds` times each, and reports every configuration's rates, wake-up
/// and memory. (It failed to parse its own arguments: its `--rounds` and the queue bench's
/// were two arguments of one name.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_pgbouncer_reports_every_configuration() {
    if !crate::common::pgbouncer_installed() {
        return;
    }
    let (t, v, stderr) =
        run_bench("pgbouncer --rounds 2 --tasks 300 --batch 100 --wakeups 5").await;
    assert_eq!(v["rounds"], 2, "{v}");
    assert_eq!(v["tasks"], 300, "{v}");
    for c in ["direct_cached", "direct_unnamed", "pgbouncer_unnamed"] {
        for f in ["enqueue_per_sec", "processed_per_sec", "wakeup_p50_ms"] {
            let per_round = v[c][f]
                .as_array()
                .unwrap_or_else(|| panic!("{c}.{f} in {v}"));
            assert_eq!(per_round.len(), 2, "{c}.{f} in {v}");
            for x in per_round {
                assert!(x.as_f64().is_some_and(|x| x > 0.0), "{c}.{f} in {v}");
            }
        }
        positive(&v[c]["memory"], "load_mib");
    }
    for f in [
        "pgbouncer_over_direct_processed",
        "pgbouncer_over_direct_enqueue",
        "unnamed_over_cached_processed",
        "unnamed_over_cached_enqueue",
    ] {
        positive(&v, f);
    }
    // Six scratch databases, each dropped.
    assert_eq!(
        assert_bench_database_dropped(&t, &stderr).await,
        6,
        "{stderr}"
    );
}
