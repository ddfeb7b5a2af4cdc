-- Every step event of a run (events with a step key), in order.
SELECT seq, event_type, step_key, payload
  FROM pgcrew.events
 WHERE run_id = $1 AND step_key IS NOT NULL
 ORDER BY seq
