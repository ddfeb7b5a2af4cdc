-- The tenant page's budget decisions: the newest $2 ledger events of tenant $1 in which a
-- budget rule decided (a reservation refused: budget_exceeded; a settled cost past a limit,
-- further reservations refused: budget_overrun; a model step degraded by the tenant's
-- degradation policy: budget_degraded), through events_budget_decisions_idx (V034).
SELECT run_id, seq, created_at, event_type, step_key, payload
  FROM pgcrew.events
 WHERE tenant_id = $1 AND event_type IN ('budget_exceeded', 'budget_overrun', 'budget_degraded')
 ORDER BY created_at DESC
 LIMIT $2
