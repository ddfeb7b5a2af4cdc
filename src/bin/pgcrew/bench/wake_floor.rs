//! The wake-up floor: the loop a wake-up goes through, in plain SQL with no pgcrew code on the
//! path, measured beside pgcrew's in the same run (`bench queue`, and `bench scale-out` with
//! its N instances idle and listening on the same database).
//!
//! A prepared INSERT that NOTIFYs in the same statement (producer connection), a dedicated
//! LISTEN connection, and a prepared one-row `UPDATE ... FOR UPDATE SKIP LOCKED` claim on a
//! third connection, sent once the notification arrives. Each sample gives the time from the
//! INSERT call and from its return (commit) to the claim's reply (client clock), and from the
//! row's creation to its claim (database clock: `now()` of each transaction, as pgcrew's
//! `claimed_at - created_at`).

use std::time::{Duration, Instant};

use pgcrew::{Db, Error, Result};
use tokio_postgres::{AsyncMessage, Client, Statement};

/// One wake-up of the floor loop, ms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FloorSample {
    /// From the INSERT call to the claim's reply (client clock).
    pub from_call_ms: f64,
    /// From the INSERT's return (its commit) to the claim's reply (client clock).
    pub from_commit_ms: f64,
    /// From the row's creation to its claim (database clock).
    pub created_to_claimed_ms: f64,
}

/// The floor loop's connections and statements; [`WakeFloor::stop`] drops its table.
pub(crate) struct WakeFloor {
    producer: Client,
    claimer: Client,
    listener: Client,
    notes: tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
    drivers: Vec<tokio::task::JoinHandle<()>>,
    insert: Statement,
    claim: Statement,
    n: u64,
}

/// How long a sample waits for its notification.
const TIMEOUT: Duration = Duration::from_secs(10);

impl WakeFloor {
    /// Create the floor's table in `db` and open its three connections (outside `db`'s pool).
    pub(crate) async fn start(db: &Db) -> Result<WakeFloor> {
        let (listener, listen_driver, notes) = Db::connect_dedicated(db.config()).await?;
        listener
            .batch_execute(pgcrew::sql!("bench/wake_floor_setup"))
            .await?;
        listener
            .batch_execute(pgcrew::sql!("bench/wake_floor_listen"))
            .await?;
        // Neither of these receives asynchronous messages: theirs are dropped.
        let (producer, producer_driver, _) = Db::connect_dedicated(db.config()).await?;
        let (claimer, claimer_driver, _) = Db::connect_dedicated(db.config()).await?;
        let drivers = vec![listen_driver, producer_driver, claimer_driver];
        let insert = producer
            .prepare(pgcrew::sql!("bench/wake_floor_insert"))
            .await?;
        let claim = claimer
            .prepare(pgcrew::sql!("bench/wake_floor_claim"))
            .await?;
        Ok(WakeFloor {
            producer,
            claimer,
            listener,
            notes,
            drivers,
            insert,
            claim,
            n: 0,
        })
    }

    /// One wake-up: insert, wait for the notification, claim.
    pub(crate) async fn sample(&mut self) -> Result<FloorSample> {
        self.n += 1;
        let payload = serde_json::json!({ "i": self.n });
        let called = Instant::now();
        self.producer.query_one(&self.insert, &[&payload]).await?;
        let committed = Instant::now();
        loop {
            match tokio::time::timeout(TIMEOUT, self.notes.recv()).await {
                Ok(Some(AsyncMessage::Notification(_))) => break,
                Ok(Some(_)) => {}
                _ => return Err(Error::Timeout(TIMEOUT)),
            }
        }
        let rows = self.claimer.query(&self.claim, &[]).await?;
        let from_call_ms = called.elapsed().as_secs_f64() * 1000.0;
        let from_commit_ms = committed.elapsed().as_secs_f64() * 1000.0;
        let [row] = rows.as_slice() else {
            return Err(Error::Config(format!(
                "the wake-up floor's loop claimed {} rows instead of 1",
                rows.len()
            )));
        };
        Ok(FloorSample {
            from_call_ms,
            from_commit_ms,
            created_to_claimed_ms: row.try_get(2)?,
        })
    }

    /// Drop the floor's table and close its connections.
    pub(crate) async fn stop(self) -> Result<()> {
        self.listener
            .batch_execute(pgcrew::sql!("bench/wake_floor_teardown"))
            .await?;
        drop((self.producer, self.claimer, self.listener));
        for d in self.drivers {
            let _ = d.await;
        }
        Ok(())
    }
}
