SELECT r.role_oid::regrole::text FROM pgcrew.tenant_roles r WHERE r.tenant_id = $1
