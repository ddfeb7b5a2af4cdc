-- Every schedule, by name ($1 NULL), or one.
SELECT name, cron, time_zone, interval_us, queue, kind, tenant_id, payload, priority,
       max_attempts, enabled, misfire, next_fire_at, last_fire_at, created_at, updated_at
  FROM pgcrew.schedules
 WHERE $1::text IS NULL OR name = $1
 ORDER BY name
