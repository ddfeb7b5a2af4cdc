-- pgcrew doctor: every backend of the cluster except the doctor's own, with its TLS state.
-- `hidden`: the session belongs to a role whose details this role may not see (PostgreSQL then
-- hides state, client address and TLS; pg_read_all_stats or superuser shows them).
SELECT a.pid,
       a.datname IS NOT DISTINCT FROM current_database() AS this_db,
       a.usename::text AS usename,
       coalesce(a.application_name, '') AS application_name,
       a.backend_type,
       host(a.client_addr) AS client_addr,
       a.client_port,
       a.usesysid IS NOT NULL AS has_user,
       coalesce(a.query = '<insufficient privilege>', false) AS hidden,
       s.ssl,
       s.version AS tls_version
  FROM pg_catalog.pg_stat_activity a
  LEFT JOIN pg_catalog.pg_stat_ssl s ON s.pid = a.pid
 WHERE a.pid <> pg_backend_pid()
 ORDER BY a.pid
