-- Append events to a run (sequenced and hash-chained by pgcrew.append_events).
SELECT o_seq, o_hash, o_created_at, o_inserted
FROM pgcrew.append_events($1::uuid, $2::int8, $3::text[], $4::text[], $5::jsonb[], $6::bool[])
