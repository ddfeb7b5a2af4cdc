-- `pgcrew bench queue`, raw claim+complete limit: statistics for the filled table.
ANALYZE bench_raw_cc
