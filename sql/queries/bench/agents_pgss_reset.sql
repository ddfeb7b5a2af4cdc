-- `pgcrew bench agents`: reset the statement counts of this database.
SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = current_database()), 0)
