-- `pgcrew bench agents`: statements executed in this database since the reset, with calls.
SELECT s.query, s.calls::bigint
  FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
 WHERE d.datname = current_database()
