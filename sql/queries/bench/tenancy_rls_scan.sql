-- All of a tenant's events (a cost or audit report).
SELECT count(*), sum(length(e.payload::text))
  FROM pgcrew.events e
 WHERE e.tenant_id = $1
