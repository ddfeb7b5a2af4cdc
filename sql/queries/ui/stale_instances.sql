-- Stale instances for the console's overview (the pgcrew.stale_instances view).
SELECT id, hostname, pid, extract(epoch FROM silent_for)::float8 AS silent_s, leader_of
  FROM pgcrew.stale_instances
 ORDER BY silent_for DESC
 LIMIT 50
