//! The notifications: channels, kinds and decoded events.

use serde::Deserialize;

use crate::ids::{InstanceId, PoolId, RunId, TaskId};

/// Every NOTIFY channel pgcrew uses.
pub const CHANNELS: &[&str] = &[
    "pgcrew_run_state_changed",
    "pgcrew_instance_registered",
    "pgcrew_instance_deregistered",
    "pgcrew_leader_changed",
    "pgcrew_task_available",
    "pgcrew_run_event",
    "pgcrew_budget_status_changed",
    "pgcrew_task_cancel_requested",
    "pgcrew_schedules_changed",
];

/// Prefix of an instance's own wake-up channel (see [`wake_channel`]).
pub const WAKE_CHANNEL_PREFIX: &str = "pgcrew_wake_";

/// The channel on which single-task enqueues wake the pools of `instance` by name:
/// `pgcrew_wake_` and the first 32 hex digits of the SHA-256 of the instance id (instance ids
/// are free text, channel names at most 63 bytes). `queue/enqueue_simple.sql` computes the same
/// name from `pgcrew.queue_waiters.instance_id`. Only the named instances' LISTEN connections
/// receive such a wake-up, so an enqueue into N idle instances wakes one process, not N.
pub fn wake_channel(instance: &InstanceId) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(instance.as_str().as_bytes());
    format!("{WAKE_CHANNEL_PREFIX}{}", hex::encode(&digest[..16]))
}

/// The kind of an [`Event`], used to filter subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// `pgcrew_run_state_changed`.
    RunStateChanged,
    /// `pgcrew_instance_registered`.
    InstanceRegistered,
    /// `pgcrew_instance_deregistered`.
    InstanceDeregistered,
    /// `pgcrew_leader_changed`.
    LeaderChanged,
    /// `pgcrew_task_available`.
    TaskAvailable,
    /// `pgcrew_run_event`.
    RunEvent,
    /// `pgcrew_budget_status_changed`.
    BudgetStatusChanged,
    /// `pgcrew_task_cancel_requested`.
    TaskCancelRequested,
    /// `pgcrew_schedules_changed`.
    SchedulesChanged,
    /// The notifier (re)connected or the subscriber fell behind: re-read state.
    Resync,
}

/// A notification, decoded from its channel's JSON payload.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A run was created or changed state. The payload carries the run id only (any role can
    /// LISTEN on any channel, so tenant ids and states stay out of payloads): re-read the run
    /// (e.g. `runs::get_run`) for its tenant and state.
    RunStateChanged {
        /// The run.
        run_id: RunId,
    },
    /// An instance registered.
    InstanceRegistered {
        /// The instance.
        instance_id: String,
    },
    /// An instance deregistered or was removed by maintenance.
    InstanceDeregistered {
        /// The instance.
        instance_id: String,
    },
    /// The leader of `name` changed (`leader_id` is `None` when the lease was released).
    LeaderChanged {
        /// The lease name.
        name: String,
        /// The new holder, if any.
        leader_id: Option<String>,
        /// The fencing term.
        term: i64,
    },
    /// Tasks became available on a queue.
    TaskAvailable {
        /// The queue.
        queue: String,
        /// The waiting pool the enqueue named to claim at once (`queue/enqueue_simple` names
        /// one of the queue's waiters in turn, on its instance's [`wake_channel`]); the other
        /// waiting pools leave the task to it. `None` (`pgcrew_task_available`): every waiting
        /// pool of the queue claims (bulk enqueues, SQL functions, `pgcrew.wake_queues`, a pool
        /// handing on work it cannot take).
        pool: Option<PoolId>,
        /// A second waiting pool, named to claim after a short delay in case the first cannot
        /// (its instance was killed before it was reaped, or it filled up meanwhile).
        backup: Option<PoolId>,
    },
    /// A run's ledger got a new event.
    RunEvent {
        /// The run.
        run_id: RunId,
        /// The event's sequence number.
        seq: i64,
    },
    /// Some tenant's budget status changed. The payload names no tenant (any role can LISTEN
    /// on any channel): re-read `pgcrew.budget_status` (e.g. `tenancy::budget_status`).
    BudgetStatusChanged,
    /// Cancellation of a running task was requested (`pgcrew.cancel_task`); the claiming
    /// instance's worker pool re-reads its tasks' cancellation flags at once.
    TaskCancelRequested {
        /// The task.
        task_id: TaskId,
        /// The instance that claimed it (`None` if the row had no claimant).
        instance_id: Option<String>,
    },
    /// A schedule was created, deleted, enabled or disabled, or its next fire was cleared or
    /// moved earlier (V038): the leader's scheduler re-reads `pgcrew.schedules`. The payload
    /// names nothing.
    SchedulesChanged,
    /// Notifications may have been missed: re-read state.
    Resync,
}

impl Event {
    /// This event's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::RunStateChanged { .. } => EventKind::RunStateChanged,
            Event::InstanceRegistered { .. } => EventKind::InstanceRegistered,
            Event::InstanceDeregistered { .. } => EventKind::InstanceDeregistered,
            Event::LeaderChanged { .. } => EventKind::LeaderChanged,
            Event::TaskAvailable { .. } => EventKind::TaskAvailable,
            Event::RunEvent { .. } => EventKind::RunEvent,
            Event::BudgetStatusChanged => EventKind::BudgetStatusChanged,
            Event::TaskCancelRequested { .. } => EventKind::TaskCancelRequested,
            Event::SchedulesChanged => EventKind::SchedulesChanged,
            Event::Resync => EventKind::Resync,
        }
    }

    /// The run this event concerns, if any.
    pub fn run_id(&self) -> Option<RunId> {
        match self {
            Event::RunStateChanged { run_id, .. } | Event::RunEvent { run_id, .. } => Some(*run_id),
            _ => None,
        }
    }

    /// Decode a notification. Unknown channels and malformed payloads give `None` (and are
    /// logged by the notifier): a payload is never trusted beyond being a wake-up.
    pub fn parse(channel: &str, payload: &str) -> Option<Event> {
        #[derive(Deserialize)]
        struct RunState {
            run_id: RunId,
        }
        #[derive(Deserialize)]
        struct Instance {
            instance_id: String,
        }
        #[derive(Deserialize)]
        struct Leader {
            name: String,
            leader_id: Option<String>,
            term: i64,
        }
        #[derive(Deserialize)]
        struct Task {
            queue: String,
            #[serde(default)]
            pool: Option<PoolId>,
            #[serde(default)]
            backup: Option<PoolId>,
        }
        #[derive(Deserialize)]
        struct RunEv {
            run_id: RunId,
            seq: i64,
        }
        #[derive(Deserialize)]
        struct Cancel {
            task_id: i64,
            instance_id: Option<String>,
        }
        let ev = match channel {
            "pgcrew_run_state_changed" => {
                let p: RunState = serde_json::from_str(payload).ok()?;
                Event::RunStateChanged { run_id: p.run_id }
            }
            "pgcrew_instance_registered" => Event::InstanceRegistered {
                instance_id: serde_json::from_str::<Instance>(payload).ok()?.instance_id,
            },
            "pgcrew_instance_deregistered" => Event::InstanceDeregistered {
                instance_id: serde_json::from_str::<Instance>(payload).ok()?.instance_id,
            },
            "pgcrew_leader_changed" => {
                let p: Leader = serde_json::from_str(payload).ok()?;
                Event::LeaderChanged {
                    name: p.name,
                    leader_id: p.leader_id,
                    term: p.term,
                }
            }
            c if c == "pgcrew_task_available" || c.starts_with(WAKE_CHANNEL_PREFIX) => {
                let p: Task = serde_json::from_str(payload).ok()?;
                Event::TaskAvailable {
                    queue: p.queue,
                    pool: p.pool,
                    backup: p.backup,
                }
            }
            "pgcrew_run_event" => {
                let p: RunEv = serde_json::from_str(payload).ok()?;
                Event::RunEvent {
                    run_id: p.run_id,
                    seq: p.seq,
                }
            }
            "pgcrew_budget_status_changed" => Event::BudgetStatusChanged,
            "pgcrew_task_cancel_requested" => {
                let p: Cancel = serde_json::from_str(payload).ok()?;
                Event::TaskCancelRequested {
                    task_id: TaskId(p.task_id),
                    instance_id: p.instance_id,
                }
            }
            "pgcrew_schedules_changed" => Event::SchedulesChanged,
            _ => return None,
        };
        Some(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_channel_payloads() {
        let id = RunId::new();
        let ev = Event::parse(
            "pgcrew_run_state_changed",
            &format!(r#"{{"run_id":"{id}"}}"#),
        );
        assert_eq!(ev, Some(Event::RunStateChanged { run_id: id }));
        // Payloads of instances from before V010 carried more fields: still a wake-up.
        let old = format!(r#"{{"run_id":"{id}","tenant_id":"t","from":null,"to":"pending"}}"#);
        assert_eq!(
            Event::parse("pgcrew_run_state_changed", &old),
            Some(Event::RunStateChanged { run_id: id })
        );
        assert_eq!(
            Event::parse("pgcrew_budget_status_changed", "{}"),
            Some(Event::BudgetStatusChanged)
        );
        assert_eq!(
            Event::parse(
                "pgcrew_leader_changed",
                r#"{"name":"default","leader_id":null,"term":3}"#
            ),
            Some(Event::LeaderChanged {
                name: "default".into(),
                leader_id: None,
                term: 3
            })
        );
        assert_eq!(
            Event::parse(
                "pgcrew_task_cancel_requested",
                r#"{"task_id":42,"instance_id":"w1"}"#
            ),
            Some(Event::TaskCancelRequested {
                task_id: TaskId(42),
                instance_id: Some("w1".into())
            })
        );
        assert_eq!(
            Event::parse("pgcrew_task_cancel_requested", r#"{"task_id":"x"}"#),
            None
        );
        assert_eq!(
            Event::parse("pgcrew_schedules_changed", "{}"),
            Some(Event::SchedulesChanged)
        );
        assert_eq!(Event::parse("pgcrew_task_available", "not json"), None);
        // Unnamed (every waiting pool claims), as before V047's naming and from bulk enqueues.
        assert_eq!(
            Event::parse("pgcrew_task_available", r#"{"queue":"q"}"#),
            Some(Event::TaskAvailable {
                queue: "q".into(),
                pool: None,
                backup: None
            })
        );
        let (a, b) = (PoolId::new(), PoolId::new());
        assert_eq!(
            Event::parse(
                "pgcrew_task_available",
                &format!(r#"{{"queue":"q","pool":"{a}","backup":"{b}"}}"#)
            ),
            Some(Event::TaskAvailable {
                queue: "q".into(),
                pool: Some(a),
                backup: Some(b)
            })
        );
        assert_eq!(
            Event::parse(
                "pgcrew_task_available",
                &format!(r#"{{"queue":"q","pool":"{a}","backup":null}}"#)
            ),
            Some(Event::TaskAvailable {
                queue: "q".into(),
                pool: Some(a),
                backup: None
            })
        );
        assert_eq!(
            Event::parse("pgcrew_task_available", r#"{"queue":"q","pool":"x"}"#),
            None
        );
        // An instance's wake channel carries the same payload.
        let ch = wake_channel(&InstanceId::new("i-1").unwrap());
        assert_eq!(
            Event::parse(
                &ch,
                &format!(r#"{{"queue":"q","pool":"{a}","backup":null}}"#)
            ),
            Some(Event::TaskAvailable {
                queue: "q".into(),
                pool: Some(a),
                backup: None
            })
        );
    }

    #[test]
    fn wake_channels_are_short_safe_and_distinct() {
        let long = "x".repeat(128);
        for id in ["a", "i-1", "名前 with spaces; DROP TABLE x", long.as_str()] {
            let ch = wake_channel(&InstanceId::new(id).unwrap());
            assert!(ch.len() <= 63, "{ch}");
            assert!(ch.starts_with(WAKE_CHANNEL_PREFIX));
            assert!(
                ch[WAKE_CHANNEL_PREFIX.len()..]
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
                "{ch}"
            );
        }
        assert_ne!(
            wake_channel(&InstanceId::new("a").unwrap()),
            wake_channel(&InstanceId::new("b").unwrap())
        );
        assert_eq!(Event::parse("other", "{}"), None);
    }
}
