-- Benchmark baseline (plain SQL): lock the run's ledger.
SELECT pg_advisory_xact_lock(1885827701, hashtext($1::uuid::text))
