-- Release run leases held by instances that are no longer registered. A lease owner is an
-- instance id, optionally followed by `/worker-name`.
WITH dead AS (
    SELECT r.id, r.lease_owner
    FROM pgcrew.runs r
    WHERE r.lease_owner IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM pgcrew.instances i
          WHERE i.id = r.lease_owner
             OR r.lease_owner LIKE replace(replace(replace(i.id, '\', '\\'), '%', '\%'), '_', '\_') || '/%')
    FOR UPDATE OF r SKIP LOCKED
)
UPDATE pgcrew.runs r
SET lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM dead
WHERE r.id = dead.id
RETURNING r.id, dead.lease_owner
