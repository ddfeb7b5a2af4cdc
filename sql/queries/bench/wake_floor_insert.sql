-- `pgcrew bench queue` and `scale-out`, wake-up floor: insert one task and NOTIFY in the same
-- statement.
WITH i AS (INSERT INTO bench_wake_floor (payload) VALUES ($1) RETURNING id)
SELECT i.id, pg_notify('bench_wake_floor', '') FROM i
