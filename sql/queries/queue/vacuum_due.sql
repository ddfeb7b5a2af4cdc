-- The worker pool's vacuum of pgcrew.tasks (issue #23, `queue::worker::vacuum`): whether it is
-- due now, and whether this session's role may vacuum the table at all (it owns it, or is a
-- member of its owner, or a superuser; for anyone else VACUUM only warns and skips it).
-- Due: the statistics count at least the table's own autovacuum threshold of dead row versions
-- (its `autovacuum_vacuum_threshold` + `autovacuum_vacuum_scale_factor` x its rows, the table's
-- settings or else the server's: V003 sets 1,000 + 1 %), and no vacuum of it, by hand or by
-- autovacuum, finished in the last $1 microseconds.
-- Also the session's statement_timeout, for the pool's warning when it cancels the vacuum.
-- $1 the least gap between two vacuums, microseconds.
SELECT coalesce(pg_stat_get_dead_tuples(c.oid)
                    >= s.threshold + s.scale_factor * greatest(c.reltuples, 0), false)
       AND coalesce(greatest(pg_stat_get_last_vacuum_time(c.oid),
                             pg_stat_get_last_autovacuum_time(c.oid))
                        < now() - $1::int8 * interval '1 microsecond', true) AS due,
       pg_has_role(c.relowner, 'USAGE') AS owner,
       current_setting('statement_timeout') AS statement_timeout
  FROM pg_class c
 CROSS JOIN LATERAL (
       SELECT coalesce(max(o.option_value) FILTER (
                           WHERE o.option_name = 'autovacuum_vacuum_threshold'),
                       current_setting('autovacuum_vacuum_threshold'))::float8 AS threshold,
              coalesce(max(o.option_value) FILTER (
                           WHERE o.option_name = 'autovacuum_vacuum_scale_factor'),
                       current_setting('autovacuum_vacuum_scale_factor'))::float8 AS scale_factor
         FROM pg_options_to_table(c.reloptions) o) s
 WHERE c.oid = 'pgcrew.tasks'::regclass
