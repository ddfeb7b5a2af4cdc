-- Append one event to a run (pgcrew.append_event: append_events' per-event path, scalar).
SELECT o_seq, o_hash, o_created_at, o_inserted
FROM pgcrew.append_event($1::uuid, $2::int8, $3::text, $4::text, $5::jsonb, $6::bool)
