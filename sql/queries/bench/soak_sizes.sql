-- Each pgcrew table: its size (heap and TOAST), its indexes' size and its dead tuples.
SELECT c.relname::text, pg_table_size(c.oid)::bigint, pg_indexes_size(c.oid)::bigint,
       coalesce(s.n_dead_tup, 0)::bigint
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'pgcrew'
  LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
 WHERE c.relkind = 'r'
