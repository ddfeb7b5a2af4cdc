-- `pgcrew bench queue`, raw claim+complete limit: $1 available rows (payload `{"i": n}`).
INSERT INTO bench_raw_cc (state, payload)
SELECT 'available', jsonb_build_object('i', n) FROM generate_series(1, $1::bigint) AS n
