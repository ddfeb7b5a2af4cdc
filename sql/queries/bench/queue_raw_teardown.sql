-- `pgcrew bench queue`, raw wake-up floor: drop the minimal queue table.
DROP TABLE bench_raw_wake
