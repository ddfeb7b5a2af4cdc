-- The last $2 ledger events of run $1, oldest first (the console's timeline).
SELECT seq, event_type, step_key, payload, created_at
  FROM (SELECT seq, event_type, step_key, payload, created_at
          FROM pgcrew.events
         WHERE run_id = $1
         ORDER BY seq DESC
         LIMIT $2) e
 ORDER BY seq
