//! The ledger key: loading it, and the CLI with and without it.

use super::*;

#[tokio::test]
async fn ledger_keys_load_from_files_and_the_environment() {
    let dir = key_dir();
    let secret = "ZZZZ-a-ledger-key-of-forty-bytes-ZZZZZZ";
    let file = dir.join("key");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let from_file = LedgerKey::from_file(&file).unwrap();
    let direct = LedgerKey::new(secret).unwrap();
    let run = RunId::new();
    // The trailing newline is not part of the key.
    assert_eq!(
        from_file.sign(run, 3, &[1; 32]),
        direct.sign(run, 3, &[1; 32])
    );
    std::fs::write(&file, format!("{secret}\r\n")).unwrap();
    assert_eq!(
        LedgerKey::from_file(&file).unwrap().sign(run, 3, &[1; 32]),
        direct.sign(run, 3, &[1; 32])
    );
    let from_env = LedgerKey::from_lookup(|n| {
        (n == "PGCREW_LEDGER_KEY_FILE").then(|| file.clone().into_os_string())
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        from_env.sign(run, 3, &[1; 32]),
        direct.sign(run, 3, &[1; 32])
    );
    // Too short, in a file or in the variable: a clear typed error that never shows the key.
    std::fs::write(&file, "short-key\n").unwrap();
    match LedgerKey::from_file(&file) {
        Err(Error::LedgerKey(m)) => {
            assert!(m.contains("at least 32") && !m.contains("short-key"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    match LedgerKey::new("x".repeat(31)) {
        Err(e @ Error::LedgerKey(_)) => assert!(e.to_string().contains("31 bytes")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        LedgerKey::from_file(dir.join("missing")),
        Err(Error::LedgerKey(_))
    ));
    assert!(format!("{direct:?}").contains("redacted"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn cli_verify_ledger_with_and_without_the_key() {
    let (t, db) = keyed_db().await;
    let (dir, key_file) = key_file_dir();
    let short_file = dir.join("short");
    std::fs::write(&short_file, "short\n").unwrap();
    let run = finished_run(&db, 8).await;
    let live = running_run(&db, 9).await;
    let cli = |args: Vec<String>, env: Vec<(&'static str, String)>| {
        let dsn = t.dsn().to_string();
        async move {
            let mut cmd = tokio::process::Command::new(pgcrew_bin());
            cmd.arg("--dsn")
                .arg(dsn)
                .args(args)
                .env_remove("PGCREW_LEDGER_KEY")
                .env_remove("PGCREW_LEDGER_KEY_FILE");
            for (k, v) in env {
                cmd.env(k, v);
            }
            let out = cmd.output().await.unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        }
    };
    let verify = |r: RunId, extra: &[&str]| {
        let mut v = vec![
            "run".to_string(),
            "verify-ledger".to_string(),
            r.to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let kf = key_file.to_string_lossy().to_string();
    // Keyed: --key-file, PGCREW_LEDGER_KEY_FILE.
    let (code, out, _) = cli(verify(run, &["--key-file", &kf]), vec![]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("valid: 11 events") && out.contains("covered by a signed checkpoint"),
        "{out}"
    );
    let (code, out, _) = cli(
        verify(run, &[]),
        vec![("PGCREW_LEDGER_KEY_FILE", kf.clone())],
    )
    .await;
    assert_eq!(code, Some(0));
    assert!(out.contains("covered by a signed checkpoint"), "{out}");
    // A running run: how far it is signed.
    let (code, out, _) = cli(verify(live, &["--key-file", &kf]), vec![]).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("signed up to seq 8 of 11"), "{out}");
    // Without a key: valid, and says plainly what is not covered.
    let (code, out, _) = cli(verify(run, &[]), vec![]).await;
    assert_eq!(code, Some(0));
    assert!(out.starts_with("valid"));
    assert!(
        out.contains("not covered without the ledger key: a full rewrite"),
        "{out}"
    );
    // A full rewrite: unkeyed still valid, keyed invalid (also with --sql).
    rewrite_event_5(&t.db, run, "{}").await;
    let (code, out, _) = cli(verify(run, &[]), vec![]).await;
    assert_eq!(code, Some(0), "{out}");
    for extra in [
        vec!["--key-file", kf.as_str()],
        vec!["--key-file", kf.as_str(), "--sql"],
    ] {
        let (code, out, _) = cli(verify(run, &extra), vec![]).await;
        assert_eq!(code, Some(1), "{out}");
        assert!(out.starts_with("invalid"), "{out}");
        assert!(out.contains("rewritten"), "{out}");
    }
    // Keys that are too short are usage errors, reported without the key.
    let (code, _, err) = cli(
        verify(run, &["--key-file", &short_file.to_string_lossy()]),
        vec![],
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(
        err.contains("at least 32") && !err.contains("short\n"),
        "{err}"
    );
    let (code, _, err) = cli(
        verify(run, &[]),
        vec![("PGCREW_LEDGER_KEY", "tiny-key".into())],
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(
        err.contains("PGCREW_LEDGER_KEY") && !err.contains("tiny-key"),
        "{err}"
    );
    // The env key itself, valid length: the rewritten run is invalid.
    let env_key = String::from_utf8(KEY.to_vec()).unwrap();
    let (code, out, _) = cli(verify(run, &[]), vec![("PGCREW_LEDGER_KEY", env_key)]).await;
    assert_eq!(code, Some(1), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `pgcrew run cancel` signs the run's final checkpoint when the ledger key is in the
/// environment, as instances do (before, the CLI's handle had no key and cancelled runs were
/// left unsigned).
#[tokio::test]
async fn cli_cancel_signs_the_final_checkpoint_with_the_environment_key() {
    let (t, db) = keyed_db().await;
    let (dir, key_file) = key_file_dir();
    let run = running_run(&db, 3).await;
    let out = tokio::process::Command::new(pgcrew_bin())
        .arg("--dsn")
        .arg(t.dsn())
        .args(["run", "cancel", &run.to_string()])
        .env_remove("PGCREW_LEDGER_KEY")
        .env("PGCREW_LEDGER_KEY_FILE", &key_file)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let finals: i64 =
        t.db.get()
            .await
            .unwrap()
            .query_one(
                "SELECT count(*) FROM pgcrew.ledger_checkpoints WHERE run_id = $1 AND final",
                &[&run],
            )
            .await
            .unwrap()
            .get(0);
    assert_eq!(finals, 1, "the cancelled run's final head is signed");
    let report = runs::verify_run_chain_signed(&t.db, run, &key())
        .await
        .unwrap();
    assert!(report.valid, "{report:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
