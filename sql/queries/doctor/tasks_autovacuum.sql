-- pgcrew doctor: autovacuum on pgcrew.tasks: its storage options and its vacuum statistics.
SELECT coalesce(c.reloptions, '{}') AS reloptions,
       coalesce(t.reloptions, '{}') AS toast_reloptions,
       coalesce(s.n_live_tup, 0) AS n_live_tup,
       coalesce(s.n_dead_tup, 0) AS n_dead_tup,
       (extract(epoch FROM now() - greatest(s.last_autovacuum, s.last_vacuum)))::float8 AS vacuumed_s_ago,
       coalesce(s.autovacuum_count, 0) AS autovacuum_count
  FROM pg_catalog.pg_class c
  LEFT JOIN pg_catalog.pg_class t ON t.oid = c.reltoastrelid
  LEFT JOIN pg_catalog.pg_stat_all_tables s ON s.relid = c.oid
 WHERE c.oid = 'pgcrew.tasks'::regclass
