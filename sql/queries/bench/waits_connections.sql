-- `pgcrew bench waits`: backends connected to this database other than this one.
SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
