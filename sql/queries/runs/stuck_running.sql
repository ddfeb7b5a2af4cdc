-- Runs `running` for longer than the stuck-run timeout (candidates; each is re-checked under
-- its run lock before it is failed).
SELECT id FROM pgcrew.runs
WHERE state = 'running' AND started_at < now() - $1::int8 * interval '1 microsecond'
ORDER BY started_at
LIMIT $2
