-- `pgcrew bench ui`: connections open to the current database.
SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
