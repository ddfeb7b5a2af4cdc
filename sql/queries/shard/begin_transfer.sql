SELECT pgcrew.begin_tenant_transfer($1)
