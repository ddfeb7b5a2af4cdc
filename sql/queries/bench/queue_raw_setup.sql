-- `pgcrew bench queue`, raw wake-up floor: a minimal queue table (no pgcrew code involved).
CREATE TABLE bench_raw_wake (id bigserial PRIMARY KEY,
                             state text NOT NULL DEFAULT 'available',
                             payload jsonb NOT NULL);
CREATE INDEX bench_raw_wake_available ON bench_raw_wake (id) WHERE state = 'available'
