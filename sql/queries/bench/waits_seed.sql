-- `pgcrew bench waits`: $2 pending runs of tenant $1 (plain INSERT: the run triggers fill the
-- lock key and ledger format), returning their ids.
INSERT INTO pgcrew.runs (id, tenant_id)
SELECT gen_random_uuid(), $1::text FROM generate_series(1, $2::int4)
RETURNING id
