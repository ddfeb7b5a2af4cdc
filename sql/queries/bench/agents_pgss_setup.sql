-- `pgcrew bench agents`: the pg_stat_statements view in the scratch database.
CREATE EXTENSION IF NOT EXISTS pg_stat_statements
