-- `pgcrew bench queue` and `scale-out`, wake-up floor: the plain LISTEN connection's channel.
LISTEN bench_wake_floor
