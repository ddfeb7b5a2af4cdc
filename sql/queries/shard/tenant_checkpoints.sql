-- The signed checkpoints of a tenant's runs.
SELECT c.run_id, c.seq, c.head_hash FROM pgcrew.ledger_checkpoints c
  JOIN pgcrew.runs r ON r.id = c.run_id
 WHERE r.tenant_id = $1
