//! Live model output of runs: what a streaming model step produces while the model is still
//! answering, for anyone watching the run. None of it is written to the ledger (the step's
//! `model_completed` event is the record, and replay only reads that).
//!
//! Two paths, both fed by the kernel's [`OutputPublisher`] (kernels built
//! [`with_streaming`](crate::kernel::Kernel::with_streaming)):
//! * in-process: [`subscribe_output`] — every delta, as it arrives, on the instance running the
//!   run;
//! * across instances: [`listen_output`] — LISTEN on the run's own channel, which receives the
//!   deltas batched (at most one NOTIFY per [`NOTIFY_INTERVAL`] per running step, since NOTIFY
//!   serialises commits cluster-wide). The channel's name is derived from the run id with the
//!   installation secret (`pgcrew.run_output_channel`, owner only), so a tenant's role cannot
//!   find, and so cannot LISTEN on, another tenant's output.
//!
//! Delivery is best effort: a subscriber that falls behind by more than [`CAPACITY`] deltas
//! misses some, and a lost notification is not resent. [`OutputEvent::Retry`] voids the text of
//! the step so far; [`OutputEvent::Done`] ends the step's output.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tracing::warn;

use crate::db::{Db, Executor};
use crate::error::Result;
use crate::ids::RunId;
use crate::model::ModelDelta;

/// Deltas buffered per in-process subscriber.
pub const CAPACITY: usize = 1024;
/// How long the cross-instance path gathers deltas into one NOTIFY.
pub const NOTIFY_INTERVAL: Duration = Duration::from_millis(50);
/// Most text bytes in one NOTIFY payload (PostgreSQL allows under 8000 in all).
const MAX_TEXT_BYTES: usize = 6000;

/// One piece of a run's live output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOutput {
    /// The run.
    pub run_id: RunId,
    /// The model step producing it.
    pub step_key: String,
    /// Its position among the pieces of this step on this path (from 0).
    pub seq: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: OutputEvent,
}

/// What a [`RunOutput`] says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum OutputEvent {
    /// More answer text.
    Text {
        /// The text added.
        text: String,
    },
    /// The model call is retried: the step's text so far is void.
    Retry {
        /// The attempt that starts (1 for the first retry).
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// The step's model call ended (`ok`: it answered; its answer is then recorded).
    Done {
        /// Whether the call answered.
        ok: bool,
    },
}

type Hub = Mutex<HashMap<RunId, broadcast::Sender<RunOutput>>>;

static HUB: LazyLock<Hub> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// The in-process subscription of one run's live output (see [`subscribe_output`]).
#[derive(Debug)]
pub struct OutputSubscription {
    run: RunId,
    rx: Option<broadcast::Receiver<RunOutput>>,
}

impl OutputSubscription {
    /// The next piece of output (`None` never happens while the subscription lives; a
    /// subscriber that fell behind skips what it missed).
    pub async fn recv(&mut self) -> Option<RunOutput> {
        let rx = self.rx.as_mut()?;
        loop {
            match rx.recv().await {
                Ok(o) => return Some(o),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(run = %self.run, missed = n, "output subscriber fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for OutputSubscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        if let Ok(mut hub) = HUB.lock()
            && hub
                .get(&self.run)
                .is_some_and(|tx| tx.receiver_count() == 0)
        {
            hub.remove(&self.run);
        }
    }
}

/// Subscribe to the live output of `run` on this instance (the one running it): every delta
/// of its streaming model steps from now on, in order.
pub fn subscribe_output(run: RunId) -> OutputSubscription {
    let rx = match HUB.lock() {
        Ok(mut hub) => hub
            .entry(run)
            .or_insert_with(|| broadcast::channel(CAPACITY).0)
            .subscribe(),
        Err(_) => broadcast::channel(1).1,
    };
    OutputSubscription { run, rx: Some(rx) }
}

fn publish_local(out: &RunOutput) {
    if let Ok(hub) = HUB.lock()
        && let Some(tx) = hub.get(&out.run_id)
    {
        let _ = tx.send(out.clone());
    }
}

/// The cross-instance subscription of one run's live output (see [`listen_output`]); holds a
/// dedicated connection until dropped.
#[derive(Debug)]
pub struct OutputListener {
    rx: mpsc::UnboundedReceiver<RunOutput>,
    _client: tokio_postgres::Client,
    handle: tokio::task::JoinHandle<()>,
}

impl OutputListener {
    /// The next batch of output; `None` when the connection ended.
    pub async fn recv(&mut self) -> Option<RunOutput> {
        self.rx.recv().await
    }
}

impl Drop for OutputListener {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// LISTEN, on a dedicated connection, for the live output of `run` from whichever instance
/// runs it. Needs the pgcrew owner's privileges (the channel name is secret-derived).
pub async fn listen_output(db: &Db, run: RunId) -> Result<OutputListener> {
    let channel = output_channel(db, run).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let ours = channel.clone();
    let (client, handle) = crate::db::connect_with_handler(db.config(), move |msg| {
        if let tokio_postgres::AsyncMessage::Notification(n) = msg
            && n.channel() == ours
            && let Ok(out) = serde_json::from_str::<RunOutput>(n.payload())
        {
            let _ = tx.send(out);
        }
    })
    .await?;
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await?;
    Ok(OutputListener {
        rx,
        _client: client,
        handle,
    })
}

async fn output_channel(db: &Db, run: RunId) -> Result<String> {
    let row = db
        .query_one(sql!("runs/output_channel"), typed![&run])
        .await?;
    Ok(row.try_get(0)?)
}

/// Publishes the live output of one model step on both paths (used by the kernel): deltas go
/// in-process at once and across instances in batches. [`finish`](Self::finish) sends
/// [`OutputEvent::Done`] and waits until everything was sent.
#[derive(Debug)]
pub struct OutputPublisher {
    tx: mpsc::UnboundedSender<OutputEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl OutputPublisher {
    /// Start publishing for step `step_key` of `run`.
    pub fn start(db: Db, run: RunId, step_key: &str) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(publish(db, run, step_key.to_string(), rx));
        Self { tx, task }
    }

    /// A sink for [`ModelPort::stream`](crate::model::ModelPort::stream).
    pub fn sink(&self) -> impl Fn(ModelDelta) + Send + Sync + 'static {
        let tx = self.tx.clone();
        move |d| {
            let event = match d {
                ModelDelta::Text { text } => OutputEvent::Text { text },
                ModelDelta::Retry { attempt, reason } => OutputEvent::Retry { attempt, reason },
            };
            let _ = tx.send(event);
        }
    }

    /// Send [`OutputEvent::Done`] and wait until every piece was published.
    pub async fn finish(self, ok: bool) {
        let _ = self.tx.send(OutputEvent::Done { ok });
        drop(self.tx);
        let _ = self.task.await;
    }
}

/// The publishing task: local delivery per event, NOTIFY per batch.
async fn publish(
    db: Db,
    run: RunId,
    step_key: String,
    mut rx: mpsc::UnboundedReceiver<OutputEvent>,
) {
    let mut channel: Option<Arc<str>> = None;
    let (mut local_seq, mut remote_seq) = (0u64, 0u64);
    let mut pending: Vec<OutputEvent> = Vec::new();
    let mut open = true;
    while open {
        let first = if pending.is_empty() {
            rx.recv().await
        } else {
            tokio::time::timeout(NOTIFY_INTERVAL, rx.recv())
                .await
                .unwrap_or(None)
        };
        let deadline = tokio::time::Instant::now() + NOTIFY_INTERVAL;
        let mut next = first;
        loop {
            let Some(ev) = next.take() else {
                open = !rx.is_closed() || !rx.is_empty();
                break;
            };
            publish_local(&RunOutput {
                run_id: run,
                step_key: step_key.clone(),
                seq: local_seq,
                event: ev.clone(),
            });
            local_seq += 1;
            let done = matches!(ev, OutputEvent::Done { .. });
            pending.push(ev);
            if done {
                open = false;
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => next = Some(e),
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        for payload in batch(
            run,
            &step_key,
            &mut remote_seq,
            std::mem::take(&mut pending),
        ) {
            if let Err(e) = notify(&db, run, &mut channel, &payload).await {
                warn!(run = %run, error = %e, "could not NOTIFY live output");
            }
        }
    }
}

/// Merge consecutive text into pieces of at most [`MAX_TEXT_BYTES`]: the NOTIFY payloads.
fn batch(run: RunId, step_key: &str, seq: &mut u64, events: Vec<OutputEvent>) -> Vec<String> {
    let mut merged: Vec<OutputEvent> = Vec::new();
    for ev in events {
        match (merged.last_mut(), ev) {
            (Some(OutputEvent::Text { text }), OutputEvent::Text { text: more })
                if text.len() + more.len() <= MAX_TEXT_BYTES =>
            {
                text.push_str(&more);
            }
            (_, OutputEvent::Text { text }) if text.len() > MAX_TEXT_BYTES => {
                merged.extend(split(&text).map(|t| OutputEvent::Text {
                    text: t.to_string(),
                }));
            }
            (_, ev) => merged.push(ev),
        }
    }
    merged
        .into_iter()
        .filter_map(|event| {
            let out = RunOutput {
                run_id: run,
                step_key: step_key.to_string(),
                seq: *seq,
                event,
            };
            *seq += 1;
            serde_json::to_string(&out).ok()
        })
        .collect()
}

/// `text` in pieces of at most [`MAX_TEXT_BYTES`], cut at character boundaries.
fn split(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(MAX_TEXT_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

async fn notify(db: &Db, run: RunId, channel: &mut Option<Arc<str>>, payload: &str) -> Result<()> {
    let name = match channel {
        Some(c) => c.clone(),
        None => {
            let c: Arc<str> = output_channel(db, run).await?.into();
            *channel = Some(c.clone());
            c
        }
    };
    db.execute(sql!("runs/notify_output"), typed![&&*name, &payload])
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_merge_text_and_respect_the_payload_limit() {
        let run = RunId::new();
        let mut seq = 0;
        let big = "é".repeat(MAX_TEXT_BYTES); // 2 bytes each
        let events = vec![
            OutputEvent::Text { text: "a".into() },
            OutputEvent::Text { text: "b".into() },
            OutputEvent::Retry {
                attempt: 1,
                reason: "cut".into(),
            },
            OutputEvent::Text { text: big.clone() },
            OutputEvent::Done { ok: true },
        ];
        let payloads = batch(run, "s", &mut seq, events);
        let outs: Vec<RunOutput> = payloads
            .iter()
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        assert_eq!(outs[0].event, OutputEvent::Text { text: "ab".into() });
        assert!(matches!(
            outs[1].event,
            OutputEvent::Retry { attempt: 1, .. }
        ));
        let rejoined: String = outs[2..outs.len() - 1]
            .iter()
            .map(|o| match &o.event {
                OutputEvent::Text { text } => text.clone(),
                _ => panic!(),
            })
            .collect();
        assert_eq!(rejoined, big);
        assert!(payloads.iter().all(|p| p.len() < 8000));
        assert_eq!(outs.last().unwrap().event, OutputEvent::Done { ok: true });
        assert_eq!(seq, outs.len() as u64);
    }
}
