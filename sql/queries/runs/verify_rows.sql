-- The fields the chain hash covers, in seq order (streamed by the Rust verifier).
SELECT seq, tenant_id, event_type, step_key,
       (extract(epoch FROM created_at) * 1000000)::int8 AS created_us,
       payload::text AS payload_text, prev_hash, hash
FROM pgcrew.events
WHERE run_id = $1
ORDER BY seq
