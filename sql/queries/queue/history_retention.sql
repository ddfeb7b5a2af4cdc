-- Retention of the queue's history: task events older than $1 microseconds (the tasks'
-- retention), queue pause records older than $2 microseconds, per-minute figures older than a
-- day; at most $3 rows of each per pass. Returns the rows deleted.
WITH te AS (
    DELETE FROM pgcrew.task_events WHERE id IN (
        SELECT id FROM pgcrew.task_events
         WHERE at < now() - $1::int8 * interval '1 microsecond' ORDER BY at LIMIT $3)
    RETURNING 1
), qp AS (
    DELETE FROM pgcrew.queue_pause_events WHERE id IN (
        SELECT id FROM pgcrew.queue_pause_events
         WHERE at < now() - $2::int8 * interval '1 microsecond' ORDER BY at LIMIT $3)
    RETURNING 1
), qm AS (
    DELETE FROM pgcrew.queue_minutes WHERE minute < now() - interval '1 day'
    RETURNING 1
)
SELECT (SELECT count(*) FROM te) + (SELECT count(*) FROM qp) + (SELECT count(*) FROM qm)
