-- `pgcrew bench queue` and `scale-out`, wake-up floor: drop the minimal queue table.
DROP TABLE bench_wake_floor
