-- Transactions of this database so far (pg_stat_database; flushed about once a second).
SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()
