-- `pgcrew bench queue`, raw claim+complete limit: drop the table.
DROP TABLE bench_raw_cc
