-- Fill pgcrew.queue_minutes (the console's throughput and latency sparklines) from the tasks
-- finished since the newest minute written, less one minute (a task finalized near a minute's
-- end may commit after the pass that wrote that minute), and at most the last hour: each pass
-- reads only recently finished tasks, through the finalized index. Minutes are rewritten
-- whole, so passes may overlap (failover, a second leader's last pass) without counting twice.
WITH since AS (
    SELECT greatest(coalesce(max(minute) - interval '1 minute', '-infinity'),
                    date_trunc('minute', now()) - interval '1 hour') AS at
      FROM pgcrew.queue_minutes
), agg AS (
    SELECT date_trunc('minute', t.finalized_at) AS minute, t.queue,
           count(*) FILTER (WHERE t.state = 'completed') AS completed,
           count(*) FILTER (WHERE t.state = 'discarded') AS discarded,
           count(*) FILTER (WHERE t.state = 'cancelled') AS cancelled,
           count(*) FILTER (WHERE t.state = 'completed' AND t.claimed_at IS NOT NULL) AS timed,
           coalesce(sum(greatest(extract(epoch FROM t.claimed_at - t.run_at), 0) * 1000)
                    FILTER (WHERE t.state = 'completed' AND t.claimed_at IS NOT NULL), 0) AS wait_ms,
           coalesce(sum(greatest(extract(epoch FROM t.finalized_at - t.claimed_at), 0) * 1000)
                    FILTER (WHERE t.state = 'completed' AND t.claimed_at IS NOT NULL), 0) AS run_ms
      FROM pgcrew.tasks t, since
     WHERE t.state IN ('completed', 'discarded', 'cancelled')
       AND t.finalized_at >= since.at
     GROUP BY 1, 2
)
INSERT INTO pgcrew.queue_minutes AS m
       (minute, queue, completed, discarded, cancelled, timed, wait_ms, run_ms)
SELECT minute, queue, completed, discarded, cancelled, timed, wait_ms, run_ms FROM agg
ON CONFLICT (minute, queue) DO UPDATE
   SET completed = EXCLUDED.completed, discarded = EXCLUDED.discarded,
       cancelled = EXCLUDED.cancelled, timed = EXCLUDED.timed,
       wait_ms = EXCLUDED.wait_ms, run_ms = EXCLUDED.run_ms
