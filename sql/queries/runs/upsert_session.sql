-- Create a session, or return the existing one with the same (tenant, identifier).
INSERT INTO pgcrew.sessions (id, tenant_id, identifier, metadata)
VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, identifier) DO UPDATE SET updated_at = now()
RETURNING id, tenant_id, identifier, metadata, created_at
