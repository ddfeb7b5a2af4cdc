-- `pgcrew bench queue`, raw wake-up floor: claim one task by UPDATE ... FOR UPDATE SKIP LOCKED.
UPDATE bench_raw_wake SET state = 'running'
 WHERE id = (SELECT id FROM bench_raw_wake WHERE state = 'available'
              ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, payload
