-- `pgcrew bench queue`, raw wake-up floor: insert one task and NOTIFY in the same statement.
WITH i AS (INSERT INTO bench_raw_wake (payload) VALUES ($1) RETURNING id)
SELECT i.id, pg_notify('bench_raw_wake', '') FROM i
