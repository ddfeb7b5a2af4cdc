-- The events recorded for one step of a run, in order.
SELECT seq, event_type, payload
  FROM pgcrew.events
 WHERE run_id = $1 AND step_key = $2
 ORDER BY seq
