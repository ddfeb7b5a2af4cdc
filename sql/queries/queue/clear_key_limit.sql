-- Remove queue $1's key limit (V028); wake its pools, which may claim more now.
WITH d AS (DELETE FROM pgcrew.queue_key_limits WHERE queue = $1 RETURNING queue)
SELECT count(*) AS removed,
       CASE WHEN count(*) > 0
            THEN EXISTS (SELECT FROM pg_notify('pgcrew_task_available', json_build_object('queue', $1::text)::text))
       END AS woke
  FROM d
