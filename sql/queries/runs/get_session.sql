SELECT id, tenant_id, identifier, metadata, created_at FROM pgcrew.sessions WHERE id = $1
