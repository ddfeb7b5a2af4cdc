SELECT pgcrew.end_tenant_transfer()
