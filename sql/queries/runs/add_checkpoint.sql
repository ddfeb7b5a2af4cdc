-- Store a signed checkpoint of a run's chain (the MAC is computed by the caller, with the key).
SELECT pgcrew.add_ledger_checkpoint($1::uuid, $2::int8, $3::bytea, $4::bytea, $5::bool)
