-- Fail runs that have been `running` for longer than the stuck-run timeout.
UPDATE pgcrew.runs
SET state = 'failed',
    error_type = 'timeout',
    error_message = 'run timed out',
    stop_reason = 'timeout',
    finalized_at = now(),
    updated_at = now(),
    lease_owner = NULL,
    lease_expires_at = NULL
WHERE id IN (
    SELECT id FROM pgcrew.runs
    WHERE state = 'running' AND started_at < now() - $1::int8 * interval '1 microsecond'
    ORDER BY started_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING id, tenant_id
