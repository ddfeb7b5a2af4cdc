-- Statements run in this database since the last reset (pg_stat_statements), the bench's own
-- sampling queries left out.
SELECT s.query, s.calls::bigint, s.total_exec_time, s.max_exec_time, s.mean_exec_time
  FROM pg_stat_statements s
  JOIN pg_database d ON d.oid = s.dbid
 WHERE d.datname = current_database()
   AND s.query NOT LIKE '%pg_stat_statements%'
   AND s.query NOT LIKE '%pg_stat_database%'
   AND s.query NOT LIKE '%pg_stat_activity%'
