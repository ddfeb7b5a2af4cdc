-- A model step's recorded events, in order, with its tenant's budget status and degradation
-- policy in the same read (the kernel decides degradation from them without another round
-- trip): one row per event, or one row with a NULL seq when nothing is recorded yet; no row
-- when the tenant does not exist.
SELECT e.seq, e.event_type, e.payload, t.budget_status, t.degradation_policy
  FROM pgcrew.tenants t
  LEFT JOIN pgcrew.events e ON e.run_id = $1 AND e.step_key = $2
 WHERE t.id = $3
 ORDER BY e.seq
