SELECT pgcrew.revoke_tenant_role($1::text) AS was_bound
