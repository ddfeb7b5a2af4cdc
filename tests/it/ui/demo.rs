//! `pgcrew demo --ui --keep`: the console serves the demo's database while it runs and after
//! it, until Ctrl-C; the database stays, and its DSN and example queries are printed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::get_json;
use crate::common::{pgcrew_bin, test_db};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_ui_and_keep_serves_the_console_and_leaves_the_database() {
    let t = test_db().await;
    let mut child = super::Proc(
        Command::new(pgcrew_bin())
            .args([
                "demo",
                "--runs",
                "2",
                "--tasks",
                "4",
                "--ui",
                "127.0.0.1:0",
                "--keep",
            ])
            .env("DATABASE_URL", t.dsn())
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("PGCREW_UI_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !lines
        .iter()
        .any(|l: &String| l.starts_with("Ctrl-C to stop"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("demo did not reach its end:\n{}", lines.join("\n")),
        }
    }
    let all = lines.join("\n");
    let url = lines
        .iter()
        .find_map(|l| l.strip_prefix("console "))
        .expect("console address")
        .trim_end_matches('/')
        .to_string();
    let dsn = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("DATABASE_URL=\""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or_else(|| panic!("DSN line missing:\n{all}"))
        .to_string();
    assert!(
        all.contains("SELECT state, count(*) FROM pgcrew.runs"),
        "{all}"
    );
    // The console still serves the finished demo.
    let (s, o) = get_json(&format!("{url}/api/overview")).await;
    assert_eq!(s, 200, "{o}");
    let runs: i64 = o["run_states"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    assert!(runs >= 2, "{o}");
    // Ctrl-C: the demo ends cleanly and the database stays.
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGINT);
    }
    assert!(child.0.wait().unwrap().success(), "{all}");
    let kept = pgcrew::Db::connect(&dsn, 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(crate::common::scalar(&kept, "SELECT count(*) FROM pgcrew.runs").await >= 2);
    let name: String = kept
        .get()
        .await
        .unwrap()
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    kept.pool().close();
    t.get()
        .await
        .unwrap()
        .batch_execute(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .await
        .unwrap();
}
