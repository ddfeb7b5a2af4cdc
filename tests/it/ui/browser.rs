//! The console in headless Chromium (Debian's `chromium` and `chromium-driver`, driven over
//! WebDriver with fantoccini): pages open, a run's state changes on the open page without a
//! reload, cancelling needs the token, and killing the leader (`pgcrew serve`, SIGKILL) changes
//! the leader on the page.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client as WebDriver, ClientBuilder, Locator};
use pgcrew::TenantId;
use pgcrew::runs::{self, NewRun, RunState};
use pgcrew::ui::UiConfig;
use serde_json::json;

use super::{TOKEN, console};
use crate::common::{eventually, pgcrew_bin, tenant, test_db};

/// chromedriver (in its own process group, so Chromium goes with it) and a session on it.
struct Browser {
    driver: Child,
    web: WebDriver,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test started.
        unsafe {
            libc::kill(-(self.driver.id() as i32), libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn browser() -> Browser {
    let port = free_port();
    let driver = Command::new(
        std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into()),
    )
    .arg(format!("--port={port}"))
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .process_group(0)
    .spawn()
    .expect("chromedriver (apt-get install chromium chromium-driver)");
    let url = format!("http://127.0.0.1:{port}");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900"]
        }),
    );
    let mut last = None;
    for _ in 0..100 {
        match ClientBuilder::rustls()
            .expect("rustls")
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(web) => return Browser { driver, web },
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no WebDriver session: {last:?}");
}

impl Browser {
    async fn js(&self, script: &str) -> serde_json::Value {
        self.web.execute(script, vec![]).await.unwrap()
    }

    /// Wait until `script` returns `want` (polling every 25 ms): whether it did within `timeout`.
    async fn until(&self, script: &str, want: serde_json::Value, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.js(script).await == want {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The text of the element `css` (read in the page: live updates replace elements).
    async fn text(&self, css: &str) -> String {
        let script = format!(
            "var e = document.querySelector({}); return e ? e.textContent : null;",
            json!(css)
        );
        match self.js(&script).await {
            serde_json::Value::String(s) => s,
            other => panic!("no element {css}: {other}"),
        }
    }

    /// Click the element `css` (found afresh each time: live updates replace elements).
    async fn click(&self, css: &str) {
        for _ in 0..20 {
            if let Ok(e) = self.web.find(Locator::Css(css)).await
                && e.click().await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cannot click {css}");
    }

    async fn close(self) {
        let _ = self.web.clone().close().await;
    }
}

/// Installed on the open run page: `window.__seenAt` becomes the time (ms since the epoch) at
/// which the run's state first shows `running`; `window.__kept` marks the document (a reload
/// would lose both).
const SEEN_RUNNING: &str = "window.__kept = 42; window.__seenAt = null;
    new MutationObserver(function () {
        var e = document.querySelector('#run-state [data-state]');
        if (window.__seenAt === null && e && e.dataset.state === 'running') {
            window.__seenAt = Date.now();
        }
    }).observe(document.documentElement, { subtree: true, childList: true, attributes: true });
    return null;";

/// This machine's clock in ms since the epoch (the browser's `Date.now()` reads the same).
fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64
}

const RUN_STATE: &str =
    "var e = document.querySelector('#run-state [data-state]'); return e ? e.dataset.state : null;";

#[tokio::test]
async fn pages_open_and_a_run_changes_state_on_the_open_page_within_a_second() {
    let c = console("ui-browser-live", UiConfig::new()).await;
    tenant(&c.t, "acme", &[], Some(5.0)).await;
    let run = runs::create_run(
        &c.t.db,
        NewRun::new(TenantId::new("acme").unwrap()).agent("support"),
    )
    .await
    .unwrap();
    let task = c
        .client
        .enqueue(&pgcrew::queue::NewTask::new("mail", &json!({"customer": 42})).unwrap())
        .await
        .unwrap()
        .id;
    let b = browser().await;
    b.web.goto(&c.url("/")).await.unwrap();
    assert!(b.text("#instances").await.contains("ui-browser-live"));
    assert!(b.text("#tenants").await.contains("acme"));
    b.web.goto(&c.url(&format!("/tasks/{task}"))).await.unwrap();
    assert_eq!(b.text("#task-state").await, "available");
    assert!(b.text("main").await.contains("customer"));
    b.web.goto(&c.url(&format!("/runs/{run}"))).await.unwrap();
    assert_eq!(b.js(RUN_STATE).await, json!("pending"));
    assert!(b.text("#chain").await.contains("verified"));
    // Wait for the page's event stream, mark the document, change the run.
    assert!(
        b.until(
            "return document.getElementById('live-status').textContent;",
            json!("live"),
            Duration::from_secs(10)
        )
        .await
    );
    // The page itself notes when the new state appears (a MutationObserver, on the browser's
    // clock, which is this machine's clock): the time measured runs from before the change is
    // made to the DOM change, without the WebDriver round trips of polling, which a loaded
    // machine stretches. Polling only waits for the note.
    b.js(SEEN_RUNNING).await;
    let before = unix_ms();
    runs::start_run(&c.t.db, run, None, None, runs::LimitPolicy::Reject)
        .await
        .unwrap();
    assert!(
        b.until(
            "return window.__seenAt !== null;",
            json!(true),
            Duration::from_secs(20)
        )
        .await,
        "the open page never showed the new state"
    );
    let seen = b.js("return window.__seenAt;").await.as_f64().unwrap();
    let took = seen - before;
    assert!(
        took <= 1000.0,
        "the open page showed the new state {took} ms after the change began (more than 1 s)"
    );
    assert_eq!(b.js(RUN_STATE).await, json!("running"));
    assert_eq!(
        b.js("return window.__kept;").await,
        json!(42),
        "the page was reloaded"
    );
    assert!(b.text("#timeline").await.contains("run_started"));
    b.close().await;
}

#[tokio::test]
async fn cancelling_from_the_page_is_refused_without_the_token_and_works_with_it_as_do_queue_and_task_actions()
 {
    let c = console("ui-browser-cancel", UiConfig::new().token(TOKEN)).await;
    tenant(&c.t, "acme", &[], None).await;
    let run = runs::create_run(&c.t.db, NewRun::new(TenantId::new("acme").unwrap()))
        .await
        .unwrap();
    let b = browser().await;
    b.web.goto(&c.url(&format!("/runs/{run}"))).await.unwrap();
    b.click("#cancel-run").await;
    assert!(b.until("return document.querySelector('[data-status]') ? document.querySelector('[data-status]').dataset.status : null;", json!("403"), Duration::from_secs(5)).await);
    assert!(b.text("main").await.contains("refused"));
    assert_eq!(
        runs::get_run(&c.t.db, run).await.unwrap().state,
        RunState::Pending
    );
    // Log in with the token, then cancel.
    b.web.goto(&c.url("/login")).await.unwrap();
    b.web
        .find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    let who = b.web.find(Locator::Id("who")).await.unwrap();
    who.clear().await.unwrap();
    who.send_keys("bob").await.unwrap();
    b.web
        .find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(
        b.until(
            "return !!document.getElementById('instances');",
            json!(true),
            Duration::from_secs(5)
        )
        .await
    );
    b.web.goto(&c.url(&format!("/runs/{run}"))).await.unwrap();
    b.click("#cancel-run").await;
    assert!(
        b.until(RUN_STATE, json!("cancelled"), Duration::from_secs(5))
            .await
    );
    let r = runs::get_run(&c.t.db, run).await.unwrap();
    assert_eq!(r.state, RunState::Cancelled);
    assert!(r.cancel_reason.unwrap().contains("by bob"));
    // Pause and resume a queue from the overview, and cancel a task from its page: each shows
    // who did it.
    let mut task = pgcrew::queue::NewTask::new("send", &json!({})).unwrap();
    task.queue = "mail".into();
    let task = c.client.enqueue(&task).await.unwrap().id;
    let paused = "var r = document.querySelector(\"tr[data-queue='mail']\"); return r ? r.dataset.paused : null;";
    b.web.goto(&c.url("/")).await.unwrap();
    b.click("tr[data-queue='mail'] .pause-queue").await;
    assert!(b.until(paused, json!("true"), Duration::from_secs(5)).await);
    assert!(b.text("tr[data-queue='mail']").await.contains("by bob"));
    assert!(b.text("#queue-pause-events").await.contains("bob"));
    b.click("tr[data-queue='mail'] .resume-queue").await;
    assert!(
        b.until(paused, json!("false"), Duration::from_secs(5))
            .await
    );
    b.web.goto(&c.url(&format!("/tasks/{task}"))).await.unwrap();
    b.click("#cancel-task").await;
    assert!(
        b.until(
            "var e = document.getElementById('task-state'); return e ? e.textContent : null;",
            json!("cancelled"),
            Duration::from_secs(5)
        )
        .await
    );
    assert!(b.text("#task-events").await.contains("bob"));
    b.close().await;
}

/// A `pgcrew serve` child (killed on drop) with test timings.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dsn: &str, id: &str, http: bool) -> (Serve, Option<String>) {
    let mut cmd = Command::new(pgcrew_bin());
    cmd.env("DATABASE_URL", dsn)
        .env_remove("PGCREW_UI_TOKEN")
        .args([
            "serve",
            "--instance-id",
            id,
            "--heartbeat-interval",
            "300ms",
        ])
        .args(["--instance-ttl", "3s", "--leader-ttl", "1500ms"])
        .args([
            "--maintenance-interval",
            "300ms",
            "--poll-interval",
            "500ms",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .stdout(Stdio::piped());
    if http {
        cmd.args(["--http", "127.0.0.1:0"]);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("console ") {
                let _ = tx.send(url.trim_end_matches('/').to_string());
            }
        }
    });
    let url = http.then(|| {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("console address")
    });
    (Serve(child), url)
}

#[tokio::test]
async fn killing_the_leader_process_changes_the_leader_on_the_open_page() {
    let t = test_db().await;
    let (mut a, _) = serve(t.dsn(), "ui-leader-a", false);
    assert!(
        eventually(Duration::from_secs(20), || async {
            crate::common::scalar(&t, "SELECT count(*) FROM pgcrew.leader WHERE leader_id = 'ui-leader-a' AND expires_at > now()").await == 1
        })
        .await,
        "a did not become leader"
    );
    let (_b, url) = serve(t.dsn(), "ui-leader-b", true);
    let url = url.unwrap();
    let b = browser().await;
    b.web.goto(&format!("{url}/")).await.unwrap();
    let leader = "var e = document.getElementById('leader'); return e ? e.dataset.leader : null;";
    assert!(
        b.until(leader, json!("ui-leader-a"), Duration::from_secs(10))
            .await
    );
    assert!(b.text("#instances").await.contains("ui-leader-b"));
    b.js("window.__kept = 1; return null;").await;
    a.0.kill().unwrap(); // SIGKILL
    let _ = a.0.wait();
    assert!(
        b.until(leader, json!("ui-leader-b"), Duration::from_secs(20))
            .await,
        "the page did not show the new leader"
    );
    assert_eq!(
        b.js("return window.__kept;").await,
        json!(1),
        "the page was reloaded"
    );
    b.close().await;
}
