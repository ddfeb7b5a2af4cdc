SELECT 1 FROM pgcrew.runs WHERE id = $1 AND tenant_id = $2
