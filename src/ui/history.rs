//! Leader history as this console has seen it: pgcrew keeps only the current lease in the
//! database, so the console records every `pgcrew_leader_changed` notification it receives
//! (holder, term, when it saw it), newest first, up to [`HISTORY_LEN`] entries.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::client::Client;
use crate::coord::notify::{Event, EventKind};

/// Leader changes kept.
pub const HISTORY_LEN: usize = 50;

/// One leader change.
#[derive(Debug, Clone, Serialize)]
pub struct LeaderChange {
    /// The lease.
    pub name: String,
    /// The new holder (`None`: released).
    pub leader_id: Option<String>,
    /// The fencing term.
    pub term: i64,
    /// When this console saw the notification.
    pub seen_at: DateTime<Utc>,
}

/// The recorded changes.
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaderHistory {
    changes: Arc<Mutex<VecDeque<LeaderChange>>>,
}

impl LeaderHistory {
    /// Record the changes `client`'s notifier delivers (when called inside a Tokio runtime).
    pub(crate) fn start(client: &Client) -> Self {
        let h = LeaderHistory::default();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let mut sub = client.subscribe(&[EventKind::LeaderChanged]);
            let changes = Arc::downgrade(&h.changes);
            rt.spawn(async move {
                while let Some(ev) = sub.recv().await {
                    let Some(changes) = changes.upgrade() else {
                        return;
                    };
                    if let Event::LeaderChanged {
                        name,
                        leader_id,
                        term,
                    } = ev
                        && let Ok(mut c) = changes.lock()
                    {
                        c.push_front(LeaderChange {
                            name,
                            leader_id,
                            term,
                            seen_at: Utc::now(),
                        });
                        c.truncate(HISTORY_LEN);
                    }
                }
            });
        }
        h
    }

    /// The changes, newest first.
    pub(crate) fn snapshot(&self) -> Vec<LeaderChange> {
        self.changes
            .lock()
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default()
    }
}
