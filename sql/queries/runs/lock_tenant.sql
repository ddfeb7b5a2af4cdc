-- Serialise run admission for one tenant (count + transition); the key is secret-derived.
SELECT pg_advisory_xact_lock(pgcrew.lock_key('tenant_runs', $1::text))
