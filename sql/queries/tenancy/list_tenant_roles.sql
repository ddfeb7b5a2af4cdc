SELECT b.role_name, b.tenant_id, b.granted_at
  FROM pgcrew.tenant_role_bindings b
 ORDER BY b.tenant_id, b.role_name
