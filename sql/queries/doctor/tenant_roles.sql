-- pgcrew doctor: every role bound to a tenant, and what makes it unsafe or unusable:
--   * superuser / BYPASSRLS / member of the role owning the pgcrew tables: RLS does not apply;
--   * `missing`: what `pgcrew tenants grant-role` grants and the role lacks (schema usage,
--     current_tenant(), SELECT on the tenant-scoped tables and the security_invoker views:
--     tenant_costs, budget_status and the metrics views of V027);
--   * `extra`: privileges beyond that: any write privilege on a pgcrew table, or SELECT on a
--     pgcrew table that row-level security does not protect.
WITH owner AS (
    SELECT c.relowner AS oid FROM pg_catalog.pg_class c WHERE c.oid = 'pgcrew.runs'::regclass
), readable AS (
    SELECT c.oid, c.relname::text AS relname,
           (c.relkind IN ('r', 'p') AND c.relrowsecurity AND c.relname <> 'tenant_roles')
           OR (c.relkind = 'v' AND c.relname IN ('tenant_costs', 'budget_status',
                                                 'tenant_metrics', 'tenant_cost_by_category',
                                                 'tenant_top_cost_runs', 'agent_metrics')) AS granted
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'pgcrew' AND c.relkind IN ('r', 'p', 'v', 'm')
)
SELECT b.role_name,
       b.tenant_id,
       b.role_dropped,
       coalesce(r.rolsuper, false) AS superuser,
       coalesce(r.rolbypassrls, false) AS bypassrls,
       coalesce(r.rolcanlogin, false) AS can_login,
       CASE WHEN b.role_dropped THEN false
            ELSE pg_has_role(b.role_oid, (SELECT o.oid FROM owner o), 'USAGE') END AS owner_member,
       CASE WHEN b.role_dropped THEN '{}'::text[]
            ELSE array(
                SELECT x.what FROM (
                    SELECT 'USAGE on schema pgcrew' AS what, 0 AS ord
                     WHERE NOT has_schema_privilege(b.role_oid, 'pgcrew', 'USAGE')
                    UNION ALL
                    SELECT 'EXECUTE on pgcrew.current_tenant()', 1
                     WHERE NOT has_function_privilege(b.role_oid, 'pgcrew.current_tenant()', 'EXECUTE')
                    UNION ALL
                    SELECT 'SELECT on pgcrew.' || g.relname, 2
                      FROM readable g
                     WHERE g.granted AND NOT has_table_privilege(b.role_oid, g.oid, 'SELECT')
                ) x ORDER BY x.ord, x.what) END AS missing,
       CASE WHEN b.role_dropped THEN '{}'::text[]
            ELSE array(
                SELECT p.priv || ' on pgcrew.' || g.relname
                  FROM readable g
                 CROSS JOIN unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'SELECT']) AS p(priv)
                 WHERE (p.priv <> 'SELECT' OR NOT g.granted)
                   AND has_table_privilege(b.role_oid, g.oid, p.priv)
                 ORDER BY g.relname, p.priv) END AS extra
  FROM pgcrew.tenant_role_bindings b
  LEFT JOIN pg_catalog.pg_roles r ON r.oid = b.role_oid
 ORDER BY b.tenant_id, b.role_name
