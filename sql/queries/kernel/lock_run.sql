-- Take the run's ledger lock (the secret-keyed advisory lock every append takes) first, so a
-- transaction that settles a budget and appends events locks in the order ledger lock, tenant
-- row, run row — the order reservations (tenant row, run row) and appends (ledger lock, run
-- row) also follow, so concurrent steps of one run cannot deadlock.
SELECT pgcrew.lock_run($1::uuid)
