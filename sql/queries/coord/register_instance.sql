-- Register (or re-register) an instance. Setting created_at fires the registration NOTIFY.
INSERT INTO pgcrew.instances (id, hostname, pid, version, metadata, created_at, last_heartbeat_at)
VALUES ($1, $2, $3, $4, $5, now(), now())
ON CONFLICT (id) DO UPDATE
SET hostname = EXCLUDED.hostname,
    pid = EXCLUDED.pid,
    version = EXCLUDED.version,
    metadata = EXCLUDED.metadata,
    created_at = now(),
    last_heartbeat_at = now()
