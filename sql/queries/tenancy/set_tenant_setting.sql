-- Scope the current transaction to one tenant for the Row-Level Security policies.
SELECT set_config('pgcrew.tenant_id', $1, true)
