//! Database round trips of one agent run (issue #23: ≤ 12 for a one-model-step run), counted
//! by a protocol-reading proxy in front of the test server.

use std::collections::BTreeMap;
use std::sync::Mutex;

use pgcrew::agent::demo::DEMO_MODEL;
use pgcrew::agent::{AgentDef, register_agent};
use pgcrew::model::ScriptedModel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::common::dsn_parts;

/// What the proxy counted: round trips (`Sync` messages and simple queries) and the statements
/// executed (`Bind` of a parsed statement, or a simple query), by their first line.
#[derive(Debug, Default)]
struct Counts {
    round_trips: u64,
    statements: BTreeMap<String, u64>,
}

/// Forward 127.0.0.1:<port> to `upstream`, counting the frontend's messages.
async fn counting_proxy(upstream: String, counts: Arc<Mutex<Counts>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let counts = counts.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let server = TcpStream::connect(upstream).await.unwrap();
                let (cr, mut cw) = client.into_split();
                let (mut sr, sw) = server.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                });
                let _ = frontend(cr, sw, &counts).await;
                down.abort();
            });
        }
    });
    port
}

async fn frontend(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    counts: &Mutex<Counts>,
) -> std::io::Result<()> {
    // Startup (an SSL request is followed by the startup message).
    loop {
        let len = from.read_i32().await?;
        let mut body = vec![0; usize::try_from(len).unwrap_or(4).saturating_sub(4)];
        from.read_exact(&mut body).await?;
        to.write_i32(len).await?;
        to.write_all(&body).await?;
        let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        if !matches!(code, 80_877_103 | 80_877_104) {
            break;
        }
    }
    let mut parsed: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let tag = from.read_u8().await?;
        let len = from.read_i32().await?;
        let mut body = vec![0; usize::try_from(len).unwrap_or(4).saturating_sub(4)];
        from.read_exact(&mut body).await?;
        to.write_u8(tag).await?;
        to.write_i32(len).await?;
        to.write_all(&body).await?;
        let mut fields = body.split(|b| *b == 0).map(String::from_utf8_lossy);
        let first_code_line = |text: &str| {
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with("--"))
                .unwrap_or("")
                .chars()
                .take(90)
                .collect::<String>()
        };
        let mut c = counts.lock().unwrap();
        match tag {
            b'Q' => {
                c.round_trips += 1;
                let text = first_code_line(&fields.next().unwrap_or_default());
                *c.statements.entry(text).or_default() += 1;
            }
            b'P' => {
                let name = fields.next().unwrap_or_default().into_owned();
                let text = first_code_line(&fields.next().unwrap_or_default());
                parsed.insert(name, text);
            }
            b'B' => {
                let _portal = fields.next();
                let name = fields.next().unwrap_or_default();
                let text = parsed.get(name.as_ref()).cloned().unwrap_or_default();
                *c.statements.entry(text).or_default() += 1;
            }
            b'S' => c.round_trips += 1,
            b'X' => return Ok(()),
            _ => {}
        }
    }
}

/// One one-model-step agent run driven by `AgentRuntime::execute` (the lease taken by the
/// runtime, as a run's task claimed without its lease): at most 10 round trips, so that with its
/// task's claim and acknowledgement (one each per claimed batch) the run stays within 12. A first
/// run on the same pool prepares the statements (prepares are once per connection).
#[tokio::test]
async fn a_one_model_step_agent_run_takes_at_most_ten_round_trips_besides_claim_and_ack() {
    let (t, tenant) = db_with_tenant("acme", &[], Some(10.0)).await;
    register_agent(
        &t.db,
        &AgentDef::new("answer", DEMO_MODEL).description("Answers at once."),
    )
    .await
    .unwrap();
    let (host, port, user, password) = dsn_parts(t.dsn());
    let counts = Arc::new(Mutex::new(Counts::default()));
    let proxy = counting_proxy(format!("{host}:{port}"), counts.clone()).await;
    let db_name = pgcrew::db::parse_dsn(t.dsn())
        .unwrap()
        .get_dbname()
        .unwrap()
        .to_string();
    let mut dsn =
        format!("host=127.0.0.1 port={proxy} user={user} dbname={db_name} sslmode=disable");
    if let Some(p) = password {
        dsn.push_str(&format!(" password={p}"));
    }
    let counted = Db::connect(&dsn, 1, Duration::from_secs(10)).await.unwrap();
    let rt = agent_runtime(
        &counted,
        Arc::new(ScriptedModel::demo_agent()),
        ToolRegistry::new(),
        "worker-1",
    );
    let submitter = agent_runtime(
        &t.db,
        Arc::new(ScriptedModel::demo_agent()),
        ToolRegistry::new(),
        "submitter",
    );
    let warm = submit_run(&submitter, &tenant, "user-1", "answer", "hello?").await;
    let run = submit_run(&submitter, &tenant, "user-1", "answer", "and again?").await;
    let done = rt.execute(warm, None).await.unwrap();
    assert_eq!(done.state, runs::RunState::Completed);
    std::mem::take(&mut *counts.lock().unwrap());

    let done = rt.execute(run, None).await.unwrap();
    let c = std::mem::take(&mut *counts.lock().unwrap());
    assert_eq!(done.state, runs::RunState::Completed);
    assert!(done.response_text.is_some());
    assert!(done.cost_usd > 0.0 && done.input_tokens > 0);
    // Everything a run records is still recorded and chained.
    let evs = ledger_events(&t.db, run).await;
    for ty in [
        "run_created",
        "run_started",
        "model_requested",
        "model_completed",
        "run_completed",
    ] {
        assert_eq!(count(&evs, ty), 1, "{ty} in {evs:?}");
    }
    assert!(runs::verify_run_chain(&t.db, run).await.unwrap().valid);
    let figures = tenancy::get(&t.db, &tenant).await.unwrap();
    assert!(figures.spent_usd > 0.0);
    assert_eq!(figures.reserved_usd, 0.0);
    assert!(
        c.round_trips <= 10,
        "{} round trips for one one-model-step run: {:#?}",
        c.round_trips,
        c.statements
    );
}

/// The one-statement start of a model step is fenced: with a lease that is no longer held the
/// step fails with `LeaseLost` before the model is called, and nothing is reserved or recorded.
#[tokio::test]
async fn a_model_step_started_with_a_stale_lease_reserves_and_records_nothing() {
    let (t, scope) = setup(&[], Some(10.0)).await;
    let lease = runs::acquire_run_lease(&t.db, scope.run, "me", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    runs::release_run_lease(&t.db, &lease).await.unwrap();
    let scope = scope.with_lease(lease.token);
    let model = Arc::new(ScriptedModel::sequence(vec![ScriptedReply::text("never")]));
    let k = Kernel::new(t.db.clone(), model.clone());
    let request = ModelRequest::new(DEMO_MODEL).user("hi").max_tokens(50);
    let err = k
        .step_model(&scope, "m1", &request, ReplayPolicy::Strict)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseLost(_)), "{err}");
    assert_eq!(model.calls(), 0);
    let tn = tenancy::get(&t.db, &scope.tenant).await.unwrap();
    assert_eq!(
        (tn.spent_usd, tn.reserved_usd, tn.active_reservations),
        (0.0, 0.0, 0)
    );
    let evs = events(&t.db, &scope).await;
    assert_eq!(count(&evs, "model_requested"), 0, "{evs:?}");
}
