-- The overview's sparklines: per queue and minute of the last hour (pgcrew.queue_minutes,
-- written by the leader), oldest first.
SELECT queue, minute, completed + discarded + cancelled AS finished, timed,
       CASE WHEN timed > 0 THEN (wait_ms + run_ms) / timed END AS latency_ms
  FROM pgcrew.queue_minutes
 WHERE minute >= date_trunc('minute', now()) - interval '59 minutes'
 ORDER BY queue, minute
