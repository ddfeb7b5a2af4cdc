-- Whether every role can read pg_locks, where the keys of held advisory locks show.
SELECT has_table_privilege('public', 'pg_catalog.pg_locks', 'SELECT')
