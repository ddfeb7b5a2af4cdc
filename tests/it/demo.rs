//! `pgcrew demo` and `pgcrew init`, end to end with the real binary.

use std::process::Stdio;
use std::time::Duration;

use crate::common::pgcrew_bin;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgcrew_demo_runs_end_to_end_on_a_throwaway_cluster() {
    let mut cmd = tokio::process::Command::new(pgcrew_bin());
    cmd.arg("demo")
        .env_remove("DATABASE_URL")
        .env_remove("PGCREW_TEST_DATABASE_URL")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("pgcrew demo finishes")
        .expect("run pgcrew demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let has = |s: &str| stdout.contains(s);
    for needle in [
        "starting a throwaway PostgreSQL cluster",
        "started 3 instances",
        ">>> kill -9 of the leader",
        ">>> failover:",
        "== summary ==",
        "runs: 16 total",
        "tasks: 40 of 40 finished",
        "ledger: 16 of 16 run chains verified valid",
        "demo finished in",
    ] {
        assert!(has(needle), "missing `{needle}` in:\n{stdout}");
    }
    // Live progress: one line per second.
    assert!(stdout.lines().filter(|l| l.starts_with('[')).count() >= 2);
    // A run the killed leader was executing finished on another instance.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(">>> run ") && !l.contains(" failed")),
        "{stdout}"
    );
    // Leader changes: at least one.
    let changes: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("leader changes: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("leader changes line");
    assert!(changes >= 1, "{stdout}");
    // Every run ended; the small-budget tenant ran out, the other did not fail.
    let runs_line = stdout
        .lines()
        .find(|l| l.starts_with("runs: 16 total"))
        .unwrap();
    assert!(runs_line.contains("budget_exceeded"), "{runs_line}");
    let acme = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("acme "))
        .expect("acme cost line");
    assert!(acme.ends_with("failed 0"), "{acme}");
    let globex = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("globex "))
        .expect("globex cost line");
    assert!(!globex.ends_with("failed 0"), "{globex}");
    // The cluster directory was removed.
    let dir = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("cluster at "))
        .and_then(|l| l.split(" on port").next())
        .expect("cluster dir line");
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}
