-- The step events of a run before a sequence number (what a fork carries over), in order.
SELECT seq, event_type, step_key, payload
  FROM pgcrew.events
 WHERE run_id = $1 AND step_key IS NOT NULL AND seq < $2
 ORDER BY seq
