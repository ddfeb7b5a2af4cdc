-- pgcrew doctor: whether the doctor's own connection uses TLS (NULL over a unix socket).
SELECT s.ssl, s.version, inet_client_addr() IS NULL AS unix_socket
  FROM pg_catalog.pg_stat_ssl s
 WHERE s.pid = pg_backend_pid()
