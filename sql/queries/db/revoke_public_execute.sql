-- After every migration run: no pgcrew function is executable by PUBLIC (tenant roles get what
-- reading needs from pgcrew.grant_tenant_access). Idempotent.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgcrew FROM PUBLIC
