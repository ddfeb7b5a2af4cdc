-- Benchmarks: the process ids of the current database's backends other than this one (for
-- their CPU time in /proc when the server runs on this machine).
SELECT coalesce(array_agg(pid), '{}')::int4[]
  FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid()
