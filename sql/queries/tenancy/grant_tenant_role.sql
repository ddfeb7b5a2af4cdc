-- Bind a role to a tenant and grant it read access (see V010).
SELECT g AS granted FROM pgcrew.grant_tenant_role($1::text, $2::text) AS g
