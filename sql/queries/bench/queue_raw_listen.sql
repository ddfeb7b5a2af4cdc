-- `pgcrew bench queue`, raw wake-up floor: the plain LISTEN connection's channel.
LISTEN bench_raw_wake
