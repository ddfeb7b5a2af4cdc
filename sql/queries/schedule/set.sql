-- Create or replace a schedule (V028). A changed timetable (cron, time zone, interval) clears
-- next_fire_at: the leader computes the next fire after now.
-- $1 name, $2 cron, $3 time zone, $4 interval µs, $5 queue, $6 kind, $7 tenant, $8 payload,
-- $9 priority, $10 max attempts, $11 enabled, $12 misfire policy.
INSERT INTO pgcrew.schedules AS s (name, cron, time_zone, interval_us, queue, kind, tenant_id,
                                   payload, priority, max_attempts, enabled, misfire)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (name) DO UPDATE
   SET cron = EXCLUDED.cron, time_zone = EXCLUDED.time_zone, interval_us = EXCLUDED.interval_us,
       queue = EXCLUDED.queue, kind = EXCLUDED.kind, tenant_id = EXCLUDED.tenant_id,
       payload = EXCLUDED.payload, priority = EXCLUDED.priority,
       max_attempts = EXCLUDED.max_attempts, enabled = EXCLUDED.enabled,
       misfire = EXCLUDED.misfire, updated_at = now(),
       next_fire_at = CASE WHEN (s.cron, s.time_zone, s.interval_us, s.enabled)
                                IS NOT DISTINCT FROM
                                (EXCLUDED.cron, EXCLUDED.time_zone, EXCLUDED.interval_us, EXCLUDED.enabled)
                           THEN s.next_fire_at END
RETURNING (xmax = 0) AS created
