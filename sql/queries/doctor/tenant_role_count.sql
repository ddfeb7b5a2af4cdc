-- pgcrew doctor: how many roles are bound to tenants.
SELECT count(*) FROM pgcrew.tenant_roles
