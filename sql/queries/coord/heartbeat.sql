UPDATE pgcrew.instances SET last_heartbeat_at = now() WHERE id = $1
