//! Forks: a new run carrying a parent's step events before a sequence number
//! (`parent_run_id`, `forked_at_seq`, a `run_forked` event), used by
//! [`ReplayPolicy::ForkOnDrift`](super::ReplayPolicy::ForkOnDrift).

use serde_json::{Value, json};
use tracing::instrument;

use super::{Kernel, RunScope};
use crate::db::Executor;
use crate::error::{Error, Result};
use crate::ids::RunId;
use crate::runs::{NewEvent, NewRun, append_events, create_run, get_run};
use crate::vocab::EventType;

impl Kernel {
    /// Create a fork of `scope.run` carrying its step events with `seq < before_seq`, in one
    /// transaction (a fork exists with all its copied events or not at all).
    #[instrument(skip(self), fields(run = %scope.run), err)]
    pub async fn fork_run(&self, scope: &RunScope, before_seq: i64) -> Result<RunId> {
        let parent = get_run(&self.db, scope.run).await?;
        if parent.tenant_id != scope.tenant {
            return Err(Error::not_found("run", scope.run));
        }
        let forked_at = before_seq - 1;
        let rows = {
            let conn = self.db.get().await?;
            conn.query(
                sql!("kernel/step_events_before"),
                typed![&scope.run, &before_seq],
            )
            .await?
        };
        let mut new = NewRun::new(scope.tenant.clone());
        new.session_id = parent.session_id;
        new.agent_name = parent.agent_name.clone();
        new.prompt = parent.prompt.clone();
        new.metadata = parent.metadata.clone();
        new.parent_run_id = Some(scope.run);
        new.forked_at_seq = Some(forked_at);
        let mut conn = self.db.get().await?;
        let tx = conn.transaction().await?;
        let fork = create_run(&tx, new).await?;
        let mut events = Vec::with_capacity(rows.len() + 1);
        for r in &rows {
            let seq: i64 = r.try_get(0)?;
            let event_type: String = r.try_get(1)?;
            let step_key: String = r.try_get(2)?;
            let mut payload: Value = r.try_get(3)?;
            if let Value::Object(m) = &mut payload {
                m.insert("copied_from_seq".into(), json!(seq));
            }
            events.push(NewEvent::new(event_type, payload).step(step_key));
        }
        events.push(NewEvent::new(
            EventType::RunForked,
            json!({"parent_run_id": scope.run, "forked_at_seq": forked_at,
                   "copied_events": rows.len()}),
        ));
        append_events(&tx, fork, &events, None).await?;
        tx.commit().await?;
        Ok(fork)
    }

    /// The fork of `scope.run` made before `before_seq` by [`fork_run`](Self::fork_run), if
    /// one exists (the first one made, when several were).
    pub(crate) async fn existing_fork(
        &self,
        scope: &RunScope,
        before_seq: i64,
    ) -> Result<Option<RunId>> {
        let forked_at = before_seq - 1;
        let row = self
            .db
            .query_opt(
                sql!("kernel/find_fork"),
                typed![&scope.run, &forked_at, &scope.tenant],
            )
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }
}
