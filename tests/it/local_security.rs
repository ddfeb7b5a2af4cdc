//! Local users and secrets: throwaway clusters are private to their owner (socket directory
//! 0700, no `trust` over TCP, a random password per cluster), and no DSN password shows up in
//! `Debug` output, errors, CLI output or a child process's command line.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgcrew::coord::client::DbSource;
use pgcrew::db::{Db, ScratchDatabase, TempCluster, parse_dsn, redact_dsn};
use pgcrew::{Client, ClientConfig, Error};

use crate::common::pgcrew_bin;

static CLUSTER: OnceLock<TempCluster> = OnceLock::new();

/// A throwaway cluster shared by this file's tests (its watchdog removes it at exit).
async fn cluster() -> &'static TempCluster {
    tokio::task::spawn_blocking(|| {
        CLUSTER.get_or_init(|| TempCluster::start().expect("start a throwaway cluster"))
    })
    .await
    .expect("cluster start task")
}

/// `host=127.0.0.1 port=<cluster port> user=postgres dbname=postgres` plus `extra`.
fn tcp_dsn(c: &TempCluster, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5{extra}",
        c.port()
    )
}

#[tokio::test]
async fn throwaway_cluster_is_private_to_its_owner_and_tcp_needs_its_password() {
    let c = cluster().await;
    let dir = c.dir();

    // The directory holding the socket, the data and the log: only its owner may enter.
    let meta = std::fs::metadata(dir).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o700,
        "{} has mode {:o}",
        dir.display(),
        meta.permissions().mode() & 0o777
    );
    // Owned by the cluster's OS user: the one running the server (the owner of its data).
    let data_owner = std::fs::metadata(dir.join("data/PG_VERSION"))
        .unwrap()
        .uid();
    assert_eq!(meta.uid(), data_owner, "directory owner");
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        assert_eq!(meta.uid(), euid, "directory owner");
    }
    assert!(
        dir.join(format!(".s.PGSQL.{}", c.port())).exists(),
        "the unix socket lives in the private directory"
    );
    assert!(
        !dir.join("pwfile").exists(),
        "the initdb password file is removed"
    );

    // The server does not inherit our environment (which may hold secrets, and which the
    // `postgres` OS user could read in the server's /proc/<pid>/environ when we are root).
    let pid_file = std::fs::read_to_string(dir.join("data/postmaster.pid")).unwrap();
    let postmaster: u32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    let environ = std::fs::read(format!("/proc/{postmaster}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    // (`cargo test` sets CARGO_MANIFEST_DIR for the test process.)
    if std::env::var_os("CARGO_MANIFEST_DIR").is_some() {
        assert!(
            !environ.contains("CARGO_MANIFEST_DIR"),
            "the server inherited the test's environment: {environ:?}"
        );
    }

    // No `trust` over TCP.
    let hba = std::fs::read_to_string(dir.join("data/pg_hba.conf")).unwrap();
    for line in hba.lines().map(str::trim) {
        if line.starts_with("host") {
            assert!(
                line.ends_with("scram-sha-256"),
                "TCP line without scram-sha-256: {line}"
            );
        }
    }

    // TCP without a password, with a wrong one, with the cluster's.
    let none = Db::connect(&tcp_dsn(c, ""), 1, Duration::from_secs(5))
        .await
        .expect_err("TCP without a password must be refused");
    assert!(
        none.to_string().contains("password"),
        "refused for the missing password: {none}"
    );
    let wrong = Db::connect(
        &tcp_dsn(c, " password=not-the-password"),
        1,
        Duration::from_secs(5),
    )
    .await
    .expect_err("TCP with a wrong password must be refused");
    assert!(matches!(wrong, Error::Authentication { .. }), "{wrong:?}");
    let db = Db::connect(&c.dsn(), 1, Duration::from_secs(5))
        .await
        .expect("the DSN's password is accepted");
    let conn = db.get().await.unwrap();
    let one: i32 = conn.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn every_throwaway_cluster_gets_its_own_random_password() {
    let a = cluster().await;
    let b = tokio::task::spawn_blocking(TempCluster::start)
        .await
        .unwrap()
        .expect("start a second cluster");
    let password = |c: &TempCluster| {
        let cfg = parse_dsn(&c.dsn()).unwrap();
        String::from_utf8(cfg.get_password().expect("the DSN has a password").to_vec()).unwrap()
    };
    let (pa, pb) = (password(a), password(&b));
    assert_eq!(pa, a.password());
    assert!(pa.len() >= 32, "a long password: {} chars", pa.len());
    assert_ne!(pa, pb, "two clusters, two passwords");
    // Each cluster accepts only its own.
    let other = format!("postgres://postgres:{pb}@127.0.0.1:{}/postgres", a.port());
    let e = Db::connect(&other, 1, Duration::from_secs(5))
        .await
        .expect_err("another cluster's password is refused");
    assert!(matches!(e, Error::Authentication { .. }), "{e:?}");
}

#[tokio::test]
async fn debug_output_never_shows_a_dsn_password() {
    let c = cluster().await;
    let password = c.password().to_string();
    let dsn = c.dsn();
    let kv = tcp_dsn(c, &format!(" password='{password}'"));

    let db = Db::connect(&dsn, 1, Duration::from_secs(5)).await.unwrap();
    let scratch = ScratchDatabase::create(&dsn, "pgcrew_secret")
        .await
        .unwrap();
    let config = ClientConfig::builder().listen_dsn(&kv).build().unwrap();
    let builder = Client::builder(dsn.as_str()).config(config.clone());
    let outputs = [
        ("TempCluster", format!("{c:?}")),
        ("Db", format!("{db:?}")),
        ("ScratchDatabase", format!("{scratch:?}")),
        ("ClientConfig", format!("{config:?}")),
        ("ClientConfig (pretty)", format!("{config:#?}")),
        ("ClientBuilder", format!("{builder:?}")),
        ("DbSource", format!("{:?}", DbSource::from(dsn.as_str()))),
        (
            "DbSource (kv)",
            format!("{:?}", DbSource::from(kv.as_str())),
        ),
    ];
    for (what, out) in &outputs {
        assert!(!out.contains(&password), "{what} Debug shows the password");
    }
    // The DSNs are still there, redacted.
    let scratch_debug = &outputs[2].1;
    assert!(scratch_debug.contains(&redact_dsn(&dsn)), "{scratch_debug}");
    assert!(outputs[3].1.contains("password='***'") || outputs[3].1.contains("password=***"));
}

#[tokio::test]
async fn errors_and_cli_output_for_bad_dsns_do_not_show_the_password() {
    let c = cluster().await;
    const SECRET: &str = "Sup3rS3cretPw";
    let cases = [
        // Malformed: not a port.
        format!("postgres://postgres:{SECRET}@127.0.0.1:notaport/postgres"),
        // Malformed: an unquoted password with a space (the second word looks like a key).
        format!("host=127.0.0.1 user=postgres password=open {SECRET}=1 dbname=postgres"),
        // Malformed: an unterminated quote.
        format!("host=127.0.0.1 user=postgres password='{SECRET} dbname=postgres"),
        // Refused: nothing listens on port 1.
        format!("postgres://postgres:{SECRET}@127.0.0.1:1/postgres?connect_timeout=2"),
        // Rejected: the wrong password for the cluster.
        format!(
            "postgres://postgres:{SECRET}@127.0.0.1:{}/postgres",
            c.port()
        ),
    ];
    for dsn in &cases {
        let e = Db::connect(dsn, 1, Duration::from_secs(2))
            .await
            .expect_err("a bad DSN fails");
        for shown in [e.to_string(), format!("{e:?}")] {
            assert!(
                !shown.contains(SECRET),
                "{dsn}: error shows the password: {shown}"
            );
        }
    }
    // A malformed DSN's error shows it, redacted, so the user can see what is wrong.
    let e = parse_dsn(&cases[0]).unwrap_err().to_string();
    assert!(
        e.contains("postgres://postgres:***@127.0.0.1:notaport/postgres") && e.contains("port"),
        "{e}"
    );

    // The CLI's error output and logs, with the DSN from the environment or from --dsn.
    for dsn in &cases {
        for via_flag in [false, true] {
            let mut cmd = std::process::Command::new(pgcrew_bin());
            cmd.env_remove("PGCREW_TEST_DATABASE_URL");
            if via_flag {
                cmd.env_remove("DATABASE_URL").args(["--dsn", dsn.as_str()]);
            } else {
                cmd.env("DATABASE_URL", dsn);
            }
            // With every log line on, so that logged errors are checked too.
            let out = cmd
                .args(["--log", "trace", "tasks", "stats"])
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(out.status.code(), Some(2), "{text}");
            assert!(
                !text.contains(SECRET),
                "CLI output shows the password: {text}"
            );
        }
    }
}

/// The command line of process `pid` (NUL-separated arguments), if it still exists.
fn cmdline(pid: u32) -> Option<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline")).ok()
}

/// The parent pid of process `pid`, if it still exists.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn no_process_carries_a_cluster_password_on_its_command_line() {
    let c = cluster().await;
    let password = c.password().to_string();
    // `pgcrew bench failover` spawns `pgcrew serve` processes on a scratch database of the
    // cluster (with the password in its DSN); they must get the DSN through the environment.
    let mut bench = std::process::Command::new(pgcrew_bin())
        .args(["bench", "failover", "--rounds", "1", "--leader-ttl", "1s"])
        .env("DATABASE_URL", c.dsn())
        .env_remove("PGCREW_TEST_DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let bench_pid = bench.id();
    let mut serves_seen = 0;
    let mut scans = 0;
    let started = Instant::now();
    while bench.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "pgcrew bench failover did not finish"
        );
        // Every process on the machine: the bench's children, the cluster's server processes,
        // its watchdog.
        for pid in all_pids() {
            let Some(args) = cmdline(pid) else { continue };
            assert!(
                !contains(&args, &password),
                "process {pid} has the password on its command line: {}",
                String::from_utf8_lossy(&args).replace('\0', " ")
            );
            if parent(pid) == Some(bench_pid) && contains(&args, "serve") {
                serves_seen += 1;
            }
        }
        scans += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = bench.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "bench failover failed: {text}");
    assert!(
        serves_seen > 0,
        "saw no `pgcrew serve` child in {scans} scans: {text}"
    );
    assert!(!text.contains(&password), "bench output shows the password");
    // The server itself (found through its pid file) never had it either.
    let pid_file = std::fs::read_to_string(c.dir().join("data/postmaster.pid")).unwrap();
    let postmaster: u32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    let args = cmdline(postmaster).expect("the postmaster is running");
    assert!(!args.is_empty() && !contains(&args, &password));
}
