SELECT pgcrew.grant_tenant_access($1) AS granted
