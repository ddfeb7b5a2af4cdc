SELECT r.id, r.ledger_head_seq FROM pgcrew.runs r WHERE r.tenant_id = $1
