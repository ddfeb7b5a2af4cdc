-- Microseconds until the next fire of any enabled schedule (0 when one has no next fire yet);
-- NULL when there is no enabled schedule.
SELECT CASE WHEN bool_or(next_fire_at IS NULL) THEN 0
            ELSE greatest(0, (extract(epoch FROM (min(next_fire_at) - clock_timestamp())) * 1000000)::bigint)
       END
  FROM pgcrew.schedules WHERE enabled
HAVING count(*) > 0
