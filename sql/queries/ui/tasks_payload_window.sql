-- The console's payload filter when pgcrew.tasks has no GIN index on payload: a bounded search
-- over a window of at most $8 tasks below task id $7 (the continuation cursor; NULL: from the
-- newest), newest first. With $9 true the window is the newest $8 tasks that match the other
-- filters (queue, state, tenant, kind), read through a partial index of the state filter
-- (available, running); with $9 false it is the newest $8 tasks of all, read through the
-- primary key, and the other filters apply inside it: either way no more than $8 tasks are
-- looked at in one pass. Returns the matches of the filters and payload @> $5 in the window,
-- newest first, at most $6. Every row carries how many tasks were looked at, how many of them
-- matched the other filters, and the newest and oldest id looked at; when nothing matched
-- there is one row whose task columns are NULL.
WITH s AS (
    SELECT count(*) AS scanned,
           count(*) FILTER (WHERE w.filtered) AS filtered,
           min(w.id) AS oldest_scanned, max(w.id) AS newest_scanned,
           (array_agg(w.id ORDER BY w.id DESC) FILTER (WHERE w.filtered AND w.hit))[1:$6]
               AS matched
      FROM (SELECT id, payload @> $5::jsonb AS hit,
                   ($1::text IS NULL OR queue = $1)
                   AND ($2::text IS NULL OR state = $2)
                   AND ($3::text IS NULL OR tenant_id = $3)
                   AND ($4::text IS NULL OR kind = $4) AS filtered
              FROM pgcrew.tasks
             WHERE ($7::int8 IS NULL OR id < $7)
               AND (NOT $9::bool
                    OR (($1::text IS NULL OR queue = $1)
                        AND ($2::text IS NULL OR state = $2)
                        AND ($3::text IS NULL OR tenant_id = $3)
                        AND ($4::text IS NULL OR kind = $4)))
             ORDER BY id DESC
             LIMIT $8) w)
SELECT s.scanned, s.filtered, s.oldest_scanned, s.newest_scanned,
       t.id, t.queue, t.kind, t.tenant_id, t.run_id, t.priority, t.state, t.payload, t.attempts,
       t.max_attempts, t.run_at, t.claimed_by, t.heartbeat_at, t.last_error, t.errors,
       t.unique_key, t.depends_on, t.pending_deps, t.cancel_requested_at, t.created_at,
       t.finalized_at
  FROM s
  LEFT JOIN pgcrew.tasks t ON t.id = ANY (s.matched)
 ORDER BY t.id DESC NULLS LAST
