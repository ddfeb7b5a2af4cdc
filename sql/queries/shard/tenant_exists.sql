SELECT EXISTS (SELECT 1 FROM pgcrew.tenants t WHERE t.id = $1)
