-- Benchmark baseline (plain SQL): insert seq + 1 chained to the previous hash.
WITH t AS (SELECT clock_timestamp() AS ts)
INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, step_key, payload, prev_hash, hash, created_at)
SELECT $1, $2, 'default', 'bench', NULL, $4::jsonb, $3,
       pgcrew.event_hash($3, $2, 'default', 'bench', NULL, t.ts, $4::jsonb), t.ts
FROM t
