-- One run's ledger, read in order (the same text for the owner and the tenant role; the
-- tenant role's policy adds its own condition).
SELECT count(*), sum(length(e.payload::text))
  FROM (SELECT e.payload FROM pgcrew.events e
         WHERE e.run_id = $1 AND e.tenant_id = $2
         ORDER BY e.seq) e
