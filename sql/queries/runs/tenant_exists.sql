SELECT EXISTS (SELECT 1 FROM pgcrew.tenants WHERE id = $1)
