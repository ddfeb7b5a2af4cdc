SELECT t.id FROM pgcrew.tenants t WHERE t.id = $1 FOR UPDATE
