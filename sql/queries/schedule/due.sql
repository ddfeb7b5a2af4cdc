-- The leader's tick: enabled schedules due now (or whose next fire is not computed yet),
-- locked so an overlapping leader skips them; with the database's now().
SELECT name, cron, time_zone, interval_us, misfire, next_fire_at, now() AS now
  FROM pgcrew.schedules
 WHERE enabled AND (next_fire_at IS NULL OR next_fire_at <= now())
 ORDER BY next_fire_at NULLS FIRST
 LIMIT $1
 FOR UPDATE SKIP LOCKED
