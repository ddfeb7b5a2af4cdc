SELECT current_setting('shared_preload_libraries') LIKE '%pg_stat_statements%'
