-- pgcrew tenant isolation bound to the database role, not to a setting.
--
-- Until now the RLS policies compared tenant_id with the session setting `pgcrew.tenant_id`,
-- which any role can change (`SET`, or `set_config()` inside a single statement), so a tenant
-- role could read every other tenant's rows. From this migration on:
--   * a protected mapping `pgcrew.tenant_roles (role OID -> tenant_id)`, writable only by the
--     pgcrew owner, binds a role to its tenant;
--   * `pgcrew.current_tenant()` is a SECURITY DEFINER function (fixed search_path) that reads
--     the mapping for the effective role (the `SET ROLE` target, else the login role); both can
--     only be roles the session is entitled to, so no setting switches the tenant;
--   * every `tenant_isolation` policy calls it once per statement (an InitPlan);
--   * NOTIFY payloads carry opaque ids only (any role can LISTEN on any channel);
--   * no pgcrew function is executable by PUBLIC; tenant roles get exactly what reading needs.
-- The pgcrew owner (and superusers, BYPASSRLS roles) are not subject to RLS: the operator path.

-- Keyed by the role's OID, not its name: a role dropped and re-created under the same name is
-- a different role and is not bound; a renamed role stays bound.
CREATE TABLE pgcrew.tenant_roles (
    role_oid   oid PRIMARY KEY,
    tenant_id  text NOT NULL REFERENCES pgcrew.tenants (id) ON DELETE CASCADE,
    granted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenant_roles_tenant_idx ON pgcrew.tenant_roles (tenant_id);
REVOKE ALL ON pgcrew.tenant_roles FROM PUBLIC;

-- Roles pinned the old way (`ALTER ROLE r SET pgcrew.tenant_id = 't'`) keep their tenant.
INSERT INTO pgcrew.tenant_roles (role_oid, tenant_id)
SELECT r.oid, t.id
  FROM pg_roles r
 CROSS JOIN LATERAL unnest(r.rolconfig) AS c(setting)
  JOIN pgcrew.tenants t ON t.id = substr(c.setting, length('pgcrew.tenant_id=') + 1)
 WHERE c.setting LIKE 'pgcrew.tenant_id=%'
ON CONFLICT (role_oid) DO NOTHING;

-- The tenant of the effective role, or NULL (which matches no row). PL/pgSQL so that its plan
-- is cached per session (a SQL-language function that cannot be inlined is planned on every
-- call); to_regrole() is a catalog-cache lookup where the pg_roles view would be a join.
-- PARALLEL SAFE: it reads the mapping and the session's own identity (both the same in a parallel
-- worker), and a parallel-unsafe function in a policy would forbid parallel plans for every
-- tenant-role query (a 500k-row scan took 1.6 x the owner's).
CREATE OR REPLACE FUNCTION pgcrew.current_tenant() RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT m.tenant_id
              FROM pgcrew.tenant_roles m
             WHERE m.role_oid = to_regrole(quote_ident(
                       CASE WHEN current_setting('role') = 'none' THEN session_user::text
                            ELSE current_setting('role') END))::oid);
END $$;

-- Every tenant_isolation policy again, now evaluating current_tenant() once per statement.
DO $$
DECLARE
    t text;
BEGIN
    DROP POLICY IF EXISTS tenant_isolation ON pgcrew.tenants;
    CREATE POLICY tenant_isolation ON pgcrew.tenants
        USING (id = (SELECT pgcrew.current_tenant()))
        WITH CHECK (id = (SELECT pgcrew.current_tenant()));
    FOR t IN
        SELECT c.relname FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
         WHERE n.nspname = 'pgcrew' AND c.relkind IN ('r', 'p')
           AND c.relname NOT IN ('tenants', 'tenant_roles')
         ORDER BY 1
    LOOP
        EXECUTE format('ALTER TABLE pgcrew.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON pgcrew.%I', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON pgcrew.%I '
                       'USING (tenant_id = (SELECT pgcrew.current_tenant())) '
                       'WITH CHECK (tenant_id = (SELECT pgcrew.current_tenant()))', t);
    END LOOP;
    FOR t IN
        SELECT c.relname FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'run_id' AND NOT a.attisdropped
         WHERE n.nspname = 'pgcrew' AND c.relkind IN ('r', 'p')
           AND NOT EXISTS (SELECT 1 FROM pg_attribute x
                            WHERE x.attrelid = c.oid AND x.attname = 'tenant_id' AND NOT x.attisdropped)
         ORDER BY 1
    LOOP
        EXECUTE format('ALTER TABLE pgcrew.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON pgcrew.%I', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON pgcrew.%I '
                       'USING (EXISTS (SELECT 1 FROM pgcrew.runs r WHERE r.id = run_id '
                       'AND r.tenant_id = (SELECT pgcrew.current_tenant()))) '
                       'WITH CHECK (EXISTS (SELECT 1 FROM pgcrew.runs r WHERE r.id = run_id '
                       'AND r.tenant_id = (SELECT pgcrew.current_tenant())))', t);
    END LOOP;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Functions: nothing for PUBLIC. A function body runs with its caller's rights (except
-- current_tenant), so this is defence in depth: a tenant role cannot even compute a lock key.
-- ---------------------------------------------------------------------------------------------
-- (A per-schema ALTER DEFAULT PRIVILEGES cannot take back the global default grant to PUBLIC,
-- so every later migration revokes EXECUTE on the functions it creates, and the migrator runs
-- this same REVOKE after every migration run: sql/queries/db/revoke_public_execute.sql.)
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgcrew FROM PUBLIC;

-- What a tenant role may read: the tenant-scoped tables (RLS), two security_invoker views, and
-- the functions reading needs (current_tenant for the policies, chain verification).
CREATE OR REPLACE FUNCTION pgcrew.grant_tenant_access(role_name text) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA pgcrew TO %I', role_name);
    FOR t IN
        SELECT p.oid::regprocedure::text
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'pgcrew'
           AND (p.proname IN ('current_tenant', 'verify_run_chain', 'ledger_event_hash')
                OR p.proname LIKE 'event\_hash%')
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', t, role_name);
    END LOOP;
    FOR t IN
        SELECT c.relname
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'pgcrew'
          AND ((c.relkind IN ('r', 'p') AND c.relrowsecurity AND c.relname <> 'tenant_roles')
               OR (c.relkind = 'v' AND c.relname IN ('tenant_costs', 'budget_status')))
        ORDER BY c.relname
    LOOP
        EXECUTE format('GRANT SELECT ON pgcrew.%I TO %I', t, role_name);
        RETURN NEXT t;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgcrew.grant_tenant_access(text) FROM PUBLIC;

-- Bind an existing role to a tenant and grant it read access. Refuses roles RLS does not
-- apply to (superusers, BYPASSRLS, the owner of the pgcrew tables) and a role already bound to
-- another tenant. Returns the tables and views granted.
CREATE FUNCTION pgcrew.grant_tenant_role(p_role text, p_tenant text) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    v_role  pg_roles;
    v_bound text;
BEGIN
    SELECT * INTO v_role FROM pg_roles WHERE rolname = p_role;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'role "%" does not exist', p_role
            USING ERRCODE = 'undefined_object', HINT = 'create it first: CREATE ROLE ... LOGIN';
    END IF;
    IF v_role.rolsuper OR v_role.rolbypassrls THEN
        RAISE EXCEPTION 'role "%" is a superuser or has BYPASSRLS: row-level security would not apply to it', p_role
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'bind a plain role (NOSUPERUSER NOBYPASSRLS) to the tenant';
    END IF;
    IF pg_has_role(p_role, (SELECT c.relowner FROM pg_class c WHERE c.oid = 'pgcrew.runs'::regclass), 'USAGE') THEN
        RAISE EXCEPTION 'role "%" owns the pgcrew tables (or has the owner''s rights): row-level security would not apply to it', p_role
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'bind a separate role that is not a member of the pgcrew owner role';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgcrew.tenants t WHERE t.id = p_tenant) THEN
        RAISE EXCEPTION 'tenant "%" does not exist', p_tenant
            USING ERRCODE = 'PC010', HINT = 'create it first: pgcrew tenants create';
    END IF;
    SELECT m.tenant_id INTO v_bound FROM pgcrew.tenant_roles m WHERE m.role_oid = v_role.oid;
    IF v_bound IS NOT NULL AND v_bound <> p_tenant THEN
        RAISE EXCEPTION 'role "%" is already bound to tenant "%"', p_role, v_bound
            USING ERRCODE = 'unique_violation',
                  HINT = 'revoke it first (pgcrew tenants revoke-role), or use another role';
    END IF;
    INSERT INTO pgcrew.tenant_roles (role_oid, tenant_id) VALUES (v_role.oid, p_tenant)
    ON CONFLICT (role_oid) DO NOTHING;
    RETURN QUERY SELECT * FROM pgcrew.grant_tenant_access(p_role);
END $$;
REVOKE ALL ON FUNCTION pgcrew.grant_tenant_role(text, text) FROM PUBLIC;

-- Unbind a role from its tenant and revoke what grant_tenant_access granted. Returns whether it
-- was bound.
CREATE FUNCTION pgcrew.revoke_tenant_role(p_role text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    t text;
    v_found boolean;
BEGIN
    DELETE FROM pgcrew.tenant_roles m
     WHERE m.role_oid = (SELECT r.oid FROM pg_roles r WHERE r.rolname = p_role);
    v_found := FOUND;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        FOR t IN
            SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'pgcrew' AND c.relkind IN ('r', 'p', 'v')
        LOOP
            EXECUTE format('REVOKE ALL ON pgcrew.%I FROM %I', t, p_role);
        END LOOP;
        FOR t IN
            SELECT p.oid::regprocedure::text
              FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'pgcrew'
        LOOP
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I', t, p_role);
        END LOOP;
        EXECUTE format('REVOKE USAGE ON SCHEMA pgcrew FROM %I', p_role);
    END IF;
    RETURN v_found;
END $$;
REVOKE ALL ON FUNCTION pgcrew.revoke_tenant_role(text) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- NOTIFY payloads: opaque ids only. PostgreSQL lets any connected role LISTEN on any channel,
-- so a payload must not carry a tenant id, a state or a budget status; receivers re-read.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgcrew.notify_run_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgcrew_run_state_changed', json_build_object('run_id', NEW.id)::text);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgcrew.notify_budget_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgcrew_budget_status_changed', '{}');
    RETURN NULL;
END $$;

-- Bound roles by name (roles dropped since they were bound show as their OID).
CREATE VIEW pgcrew.tenant_role_bindings AS
SELECT coalesce(r.rolname::text, m.role_oid::text) AS role_name, m.role_oid, m.tenant_id, m.granted_at,
       r.oid IS NULL AS role_dropped
  FROM pgcrew.tenant_roles m
  LEFT JOIN pg_roles r ON r.oid = m.role_oid;
REVOKE ALL ON pgcrew.tenant_role_bindings FROM PUBLIC;
