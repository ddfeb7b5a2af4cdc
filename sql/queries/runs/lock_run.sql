-- Serialise ledger appends, leases and transitions of one run.
SELECT pgcrew.lock_run($1::uuid)
