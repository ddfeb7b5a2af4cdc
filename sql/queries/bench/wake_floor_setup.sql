-- `pgcrew bench queue` and `scale-out`, wake-up floor: a minimal queue table (no pgcrew code
-- involved). created_at is stamped by the database, as pgcrew.tasks' is.
CREATE TABLE bench_wake_floor (id bigserial PRIMARY KEY,
                               state text NOT NULL DEFAULT 'available',
                               created_at timestamptz NOT NULL DEFAULT now(),
                               payload jsonb NOT NULL);
CREATE INDEX bench_wake_floor_available ON bench_wake_floor (id) WHERE state = 'available'
