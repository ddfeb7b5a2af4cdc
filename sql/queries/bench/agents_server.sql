-- `pgcrew bench agents`: server counters sampled before and after a phase: this database's
-- committed transactions, the cluster's WAL records, bytes and syncs (pg_stat_wal, the whole
-- cluster), and the process ids of this database's other backends (for their CPU time in /proc).
SELECT d.xact_commit::bigint,
       w.wal_records::bigint,
       w.wal_bytes::bigint,
       w.wal_sync::bigint,
       (SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid())::int4[]
  FROM pg_stat_database d, pg_stat_wal w
 WHERE d.datname = current_database()
