-- Benchmark: a run in ledger format 1 (as runs created before the v2 migration), so v1 and v2
-- appends can be measured side by side.
INSERT INTO pgcrew.runs (id, tenant_id, ledger_format) VALUES ($1, $2, 1)
