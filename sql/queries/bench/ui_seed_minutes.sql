-- `pgcrew bench ui`: per-minute figures (pgcrew.queue_minutes) for every minute of the last
-- hour of every queue, as the leader's maintenance writes them, so the overview's sparklines
-- read their 60 rows per queue.
INSERT INTO pgcrew.queue_minutes (minute, queue, completed, discarded, cancelled, timed,
                                  wait_ms, run_ms)
SELECT date_trunc('minute', now()) - m * interval '1 minute', q.queue,
       100 + m, m % 3, m % 2, 100 + m, (100 + m) * 5.0, (100 + m) * 20.0
  FROM (SELECT DISTINCT queue FROM pgcrew.tasks) q, generate_series(0, 59) m
ON CONFLICT (minute, queue) DO NOTHING
