-- Microseconds until the current lease expires (negative or null when it already has).
SELECT leader_id, term, (extract(epoch FROM expires_at - now()) * 1000000)::int8 AS remaining_us
FROM pgcrew.leader WHERE name = $1
