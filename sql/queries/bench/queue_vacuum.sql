-- Benchmarks: vacuum and analyze the tasks table, as autovacuum would soon do (its thresholds
-- on this table are low).
VACUUM (ANALYZE) pgcrew.tasks
