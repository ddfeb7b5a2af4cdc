//! Reading runs: following the ledger, artifacts and summaries, sessions, and the `run` CLI.

use super::*;
use crate::common::cli;

#[tokio::test]
async fn tail_follow_sees_events_appended_by_another_process() {
    use tokio::io::AsyncBufReadExt;
    let t = test_db().await;
    let run = run_with_events(&t.db, 2).await;
    let mut child = tokio::process::Command::new(pgcrew_bin())
        .env("DATABASE_URL", t.dsn())
        .args(["run", "tail", &run.to_string(), "--follow"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut got = Vec::new();
    // The existing events first.
    for _ in 0..3 {
        let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(l);
    }
    // Then live ones, appended after the CLI started following.
    for i in 0..3 {
        runs::append_event(
            &t.db,
            run,
            NewEvent::new("live", json!({"i": i})).step(format!("k{i}")),
            None,
        )
        .await
        .unwrap();
    }
    for _ in 0..3 {
        let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("tail --follow printed the live event")
            .unwrap()
            .unwrap();
        got.push(l);
    }
    let fields: Vec<Vec<&str>> = got.iter().map(|l| l.split('\t').collect()).collect();
    assert!(fields.iter().all(|f| f.len() == 4), "{got:?}");
    assert_eq!(
        fields.iter().map(|f| f[0]).collect::<Vec<_>>(),
        vec!["1", "2", "3", "4", "5", "6"]
    );
    assert_eq!(fields[0][2], "run_created");
    assert_eq!(fields[5][2], "live");
    assert_eq!(fields[5][3], "k2");
    // Once the run is finished and printed, --follow exits by itself.
    runs::cancel_run(&t.db, run, "done").await.unwrap();
    let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(l.contains("run_cancelled"), "{l}");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("tail --follow exits after the run finished")
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn artifacts_and_summaries() {
    let (t, run) = db_with_run().await;
    let v1 = runs::put_artifact(&t.db, run, "plan", json!({"steps": 1}), None)
        .await
        .unwrap();
    let v2 = runs::put_artifact(&t.db, run, "plan", json!({"steps": 2}), None)
        .await
        .unwrap();
    runs::put_artifact(&t.db, run, "notes", json!("x"), None)
        .await
        .unwrap();
    assert_eq!((v1.version, v2.version), (1, 2));
    let latest = runs::get_artifact(&t.db, run, "plan")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.value, json!({"steps": 2}));
    let hist = runs::artifact_history(&t.db, run, "plan").await.unwrap();
    assert_eq!(
        hist.iter().map(|a| a.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let all = runs::list_artifacts(&t.db, run).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|a| (a.key.as_str(), a.version))
            .collect::<Vec<_>>(),
        vec![("notes", 1), ("plan", 2)]
    );
    assert!(
        runs::get_artifact(&t.db, run, "missing")
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        runs::put_artifact(&t.db, run, "", json!(1), None).await,
        Err(Error::InvalidInput { .. })
    ));
    for (kind, content) in [
        ("conversation", SummaryContent::Text("hello".into())),
        ("plan", SummaryContent::Json(json!({"a": 1}))),
        ("conversation", SummaryContent::Text("bye".into())),
    ] {
        runs::add_summary(&t.db, run, kind, content, None)
            .await
            .unwrap();
    }
    let conv = runs::list_summaries(&t.db, run, Some("conversation"), 10)
        .await
        .unwrap();
    assert_eq!(
        conv.iter().map(|s| s.content.clone()).collect::<Vec<_>>(),
        vec![
            SummaryContent::Text("bye".into()),
            SummaryContent::Text("hello".into())
        ]
    );
    assert_eq!(
        runs::list_summaries(&t.db, run, None, 2)
            .await
            .unwrap()
            .len(),
        2
    );
    // The CLI shows them.
    let out = cli(t.dsn(), ["run", "artifacts", &run.to_string(), "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn sessions_list_and_cli_list_status_cancel() {
    let t = test_db().await;
    let s = runs::new_session(&t.db, &tenant("default"), "chat-1", json!({"u": 1}))
        .await
        .unwrap();
    let same = runs::new_session(&t.db, &tenant("default"), "chat-1", json!({}))
        .await
        .unwrap();
    assert_eq!(s.id, same.id);
    assert_eq!(
        runs::get_session(&t.db, s.id).await.unwrap().identifier,
        "chat-1"
    );
    add_tenant(&t.db, "other", None).await;
    // A session of another tenant cannot be used.
    assert!(matches!(
        runs::create_run(&t.db, NewRun::new(tenant("other")).session(s.id)).await,
        Err(Error::NotFound { .. })
    ));
    let r1 = runs::create_run(&t.db, NewRun::new(tenant("default")).session(s.id))
        .await
        .unwrap();
    let r2 = runs::create_run(&t.db, NewRun::new(tenant("other")))
        .await
        .unwrap();
    let run_cli = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        cli(t.dsn(), args)
    };
    let list = run_cli(&["run", "list", "--tenant", "other"]).await;
    assert_eq!(list.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), r2.to_string());
    let bad = run_cli(&["run", "list", "--state", "weird"]).await;
    assert_eq!(bad.status.code(), Some(2));
    let cancel = run_cli(&["run", "cancel", &r1.to_string()]).await;
    assert_eq!(cancel.status.code(), Some(0), "{cancel:?}");
    let status = run_cli(&["run", "status", &r1.to_string(), "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["state"], "cancelled");
    assert_eq!(v["session_id"], s.id.to_string());
    let again = run_cli(&["run", "cancel", &r1.to_string()]).await;
    assert_eq!(again.status.code(), Some(2));
}

#[tokio::test]
async fn cli_tail_json_prints_one_event_per_line() {
    let t = test_db().await;
    let run = run_with_events(&t.db, 4).await;
    let out = cli(t.dsn(), ["run", "tail", &run.to_string(), "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<i64> = lines.iter().map(|v| v["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=5).collect::<Vec<_>>());
    assert!(lines.iter().all(|v| v["event_type"].is_string()));
}
