-- `pgcrew bench queue`, raw claim+complete limit: a minimal queue table of the shape the
-- issue's pgbench baseline used (no pgcrew code involved), filled with $tasks rows by the
-- following statement.
DROP TABLE IF EXISTS bench_raw_cc;
CREATE TABLE bench_raw_cc (id bigserial PRIMARY KEY,
                           state text NOT NULL,
                           payload jsonb NOT NULL,
                           claimed_at timestamptz,
                           finalized_at timestamptz) WITH (fillfactor = 50);
CREATE INDEX bench_raw_cc_available ON bench_raw_cc (id) WHERE state = 'available'
