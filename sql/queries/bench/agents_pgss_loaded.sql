-- `pgcrew bench agents`: whether the server loaded pg_stat_statements.
SELECT current_setting('shared_preload_libraries') LIKE '%pg_stat_statements%'
