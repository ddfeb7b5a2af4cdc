DELETE FROM pgcrew.instances
WHERE last_heartbeat_at < now() - $1::int8 * interval '1 microsecond'
RETURNING id
