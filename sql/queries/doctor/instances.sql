-- pgcrew doctor: registered instances with their silence (database time), oldest heartbeat first.
SELECT i.id,
       i.hostname,
       i.pid,
       i.version,
       (extract(epoch FROM now() - i.last_heartbeat_at) * 1000)::int8 AS silent_ms
  FROM pgcrew.instances i
 ORDER BY i.last_heartbeat_at, i.id
