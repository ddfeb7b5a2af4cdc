-- The tenant's 100 most recent events.
SELECT count(*), sum(length(e.payload::text))
  FROM (SELECT e.payload FROM pgcrew.events e
         WHERE e.tenant_id = $1
         ORDER BY e.created_at DESC LIMIT 100) e
