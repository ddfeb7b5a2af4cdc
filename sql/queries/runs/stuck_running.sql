-- Runs `running` for longer than the stuck-run timeout whose lease is not being renewed
-- (candidates; each is re-checked under its run lock before it is failed). A run whose lease
-- is live is never stuck, however long it has been running: its holder renews the lease.
SELECT id FROM pgcrew.runs
WHERE state = 'running' AND started_at < now() - $1::int8 * interval '1 microsecond'
  AND (lease_expires_at IS NULL OR lease_expires_at <= now())
ORDER BY started_at
LIMIT $2
