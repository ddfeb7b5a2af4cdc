-- `pgcrew bench queue`, raw claim+complete limit: complete the claimed batch.
UPDATE bench_raw_cc SET state = 'completed', finalized_at = now() WHERE id = ANY($1::bigint[])
