-- `pgcrew bench queue` and `scale-out`, wake-up floor: claim one task by UPDATE ... FOR UPDATE
-- SKIP LOCKED; also the time from its creation to this claim, ms (database clock, as
-- `scale-out` reads pgcrew's claimed_at - created_at).
UPDATE bench_wake_floor SET state = 'running'
 WHERE id = (SELECT id FROM bench_wake_floor WHERE state = 'available'
              ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, payload, extract(epoch FROM now() - created_at)::float8 * 1000 AS created_to_claimed_ms
