-- pgcrew tenancy: budget thresholds and status, degradation policy, budget reservations,
-- cost entries, per-run budgets, operator views and Row-Level Security policies.
--
-- Money is `numeric(20, 10)` everywhere so that sum(cost_entries.cost_usd) = tenants.spent_usd
-- exactly. Clients bind and read float8 and cast.

-- ---------------------------------------------------------------------------------------------
-- Tenants: thresholds, computed budget status, degradation policy
-- ---------------------------------------------------------------------------------------------
ALTER TABLE pgcrew.tenants
    ADD COLUMN warning_threshold  numeric(6, 4) NOT NULL DEFAULT 0.80,
    ADD COLUMN critical_threshold numeric(6, 4) NOT NULL DEFAULT 0.90,
    ADD COLUMN budget_status      text NOT NULL DEFAULT 'HEALTHY'
        CHECK (budget_status IN ('HEALTHY', 'WARNING', 'CRITICAL', 'EXCEEDED')),
    ADD COLUMN degradation_policy jsonb NOT NULL DEFAULT '{"rules": []}'::jsonb,
    ADD CONSTRAINT tenants_thresholds_check
        CHECK (warning_threshold > 0 AND warning_threshold <= critical_threshold AND critical_threshold <= 1),
    ADD CONSTRAINT tenants_budget_finite_check
        CHECK (budget_usd_limit IS NULL OR budget_usd_limit <> 'NaN'::numeric);

-- The status of a budget: EXCEEDED at or above the limit, CRITICAL / WARNING at or above the
-- thresholds (fractions of the limit), HEALTHY below; always HEALTHY without a limit.
CREATE FUNCTION pgcrew.budget_status_of(spent numeric, lim numeric, warning numeric, critical numeric)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN lim IS NULL THEN 'HEALTHY'
        WHEN spent >= lim THEN 'EXCEEDED'
        WHEN spent >= lim * critical THEN 'CRITICAL'
        WHEN spent >= lim * warning THEN 'WARNING'
        ELSE 'HEALTHY'
    END
$$;

CREATE FUNCTION pgcrew.tenants_compute_budget_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.budget_status := pgcrew.budget_status_of(NEW.spent_usd, NEW.budget_usd_limit,
                                                 NEW.warning_threshold, NEW.critical_threshold);
    RETURN NEW;
END $$;

CREATE TRIGGER tenants_budget_status BEFORE INSERT OR UPDATE ON pgcrew.tenants
    FOR EACH ROW EXECUTE FUNCTION pgcrew.tenants_compute_budget_status();

-- Only fires when the status actually changes, so the reserve/settle hot path never notifies.
-- (A plain AFTER UPDATE: a column set by a BEFORE trigger does not count for `UPDATE OF`.)
CREATE FUNCTION pgcrew.notify_budget_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgcrew_budget_status_changed',
        json_build_object('tenant_id', NEW.id, 'status', NEW.budget_status)::text);
    RETURN NULL;
END $$;

CREATE TRIGGER tenants_budget_status_changed AFTER UPDATE ON pgcrew.tenants
    FOR EACH ROW WHEN (OLD.budget_status IS DISTINCT FROM NEW.budget_status)
    EXECUTE FUNCTION pgcrew.notify_budget_status();

-- ---------------------------------------------------------------------------------------------
-- Per-run budgets (optional)
-- ---------------------------------------------------------------------------------------------
ALTER TABLE pgcrew.runs
    ADD COLUMN budget_usd_limit    numeric(20, 10)
        CHECK (budget_usd_limit IS NULL OR (budget_usd_limit >= 0 AND budget_usd_limit <> 'NaN'::numeric)),
    ADD COLUMN budget_reserved_usd numeric(20, 10) NOT NULL DEFAULT 0 CHECK (budget_reserved_usd >= 0),
    ADD COLUMN budget_spent_usd    numeric(20, 10) NOT NULL DEFAULT 0 CHECK (budget_spent_usd >= 0);

-- ---------------------------------------------------------------------------------------------
-- Budget reservations: one row per in-flight model call. Lock order: tenant row, then run row.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE pgcrew.budget_reservations (
    id          uuid PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES pgcrew.tenants (id),
    run_id      uuid REFERENCES pgcrew.runs (id) ON DELETE SET NULL,
    instance_id text,
    model       text,
    amount_usd  numeric(20, 10) NOT NULL CHECK (amount_usd >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX budget_reservations_tenant_idx ON pgcrew.budget_reservations (tenant_id);
CREATE INDEX budget_reservations_instance_idx ON pgcrew.budget_reservations (instance_id);
CREATE INDEX budget_reservations_created_idx ON pgcrew.budget_reservations (created_at);

-- ---------------------------------------------------------------------------------------------
-- Cost entries: every charged cost, by tenant, run, category and model.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE pgcrew.cost_entries (
    id                bigserial PRIMARY KEY,
    tenant_id         text NOT NULL REFERENCES pgcrew.tenants (id),
    run_id            uuid REFERENCES pgcrew.runs (id) ON DELETE SET NULL,
    category          text NOT NULL CHECK (category IN ('llm', 'tool', 'retrieval', 'storage', 'other')),
    model             text,
    step_key          text,
    prompt_tokens     bigint NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens bigint NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    cost_usd          numeric(20, 10) NOT NULL CHECK (cost_usd >= 0),
    reservation_id    uuid,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cost_entries_tenant_idx ON pgcrew.cost_entries (tenant_id, created_at);
CREATE INDEX cost_entries_run_idx ON pgcrew.cost_entries (run_id) WHERE run_id IS NOT NULL;

-- ---------------------------------------------------------------------------------------------
-- Operator views (security_invoker: they respect the RLS policies of the querying role)
-- ---------------------------------------------------------------------------------------------
CREATE VIEW pgcrew.tenant_costs WITH (security_invoker = true) AS
SELECT c.tenant_id,
       (c.created_at AT TIME ZONE 'UTC')::date AS day,
       c.category,
       coalesce(c.model, '') AS model,
       count(*) AS entries,
       sum(c.prompt_tokens)::bigint AS prompt_tokens,
       sum(c.completion_tokens)::bigint AS completion_tokens,
       sum(c.cost_usd) AS cost_usd
FROM pgcrew.cost_entries c
GROUP BY c.tenant_id, (c.created_at AT TIME ZONE 'UTC')::date, c.category, coalesce(c.model, '');

CREATE VIEW pgcrew.budget_status WITH (security_invoker = true) AS
SELECT t.id AS tenant_id,
       t.budget_usd_limit,
       t.spent_usd,
       t.reserved_usd,
       CASE WHEN t.budget_usd_limit IS NULL THEN NULL
            ELSE greatest(t.budget_usd_limit - t.spent_usd - t.reserved_usd, 0) END AS remaining_usd,
       CASE WHEN t.budget_usd_limit IS NULL OR t.budget_usd_limit = 0 THEN NULL
            ELSE round(100 * t.spent_usd / t.budget_usd_limit, 2) END AS used_pct,
       t.budget_status AS status,
       t.warning_threshold,
       t.critical_threshold,
       (SELECT count(*) FROM pgcrew.budget_reservations r WHERE r.tenant_id = t.id) AS active_reservations,
       t.updated_at
FROM pgcrew.tenants t;

-- ---------------------------------------------------------------------------------------------
-- Row-Level Security for operators who give tenants SQL access.
--
-- A role that does not own the tables (and is not a superuser / BYPASSRLS) sees only the rows of
-- the tenant named by the session setting `pgcrew.tenant_id`; without the setting it sees none:
--     SET pgcrew.tenant_id = 'acme';      -- or ALTER ROLE acme_reader SET pgcrew.tenant_id = 'acme'
-- The pgcrew owner role is not affected (no FORCE ROW LEVEL SECURITY). Grant read access with
--     SELECT pgcrew.grant_tenant_access('acme_reader');
-- Policies are created for every tenant-scoped table present when this migration runs; later
-- migrations adding tenant-scoped tables must add their own `tenant_isolation` policy.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION pgcrew.current_tenant() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('pgcrew.tenant_id', true), '')
$$;

ALTER TABLE pgcrew.tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON pgcrew.tenants
    USING (id = pgcrew.current_tenant()) WITH CHECK (id = pgcrew.current_tenant());

-- Every table of the schema with a `tenant_id` column is isolated on it; tables keyed by run
-- only (artifacts, summaries) are isolated through their run.
DO $$
DECLARE
    t text;
BEGIN
    FOR t IN
        SELECT c.table_name FROM information_schema.columns c
        JOIN information_schema.tables tb
          ON tb.table_schema = c.table_schema AND tb.table_name = c.table_name
        WHERE c.table_schema = 'pgcrew' AND c.column_name = 'tenant_id'
          AND tb.table_type = 'BASE TABLE' AND c.table_name <> 'tenants'
        ORDER BY 1
    LOOP
        EXECUTE format('ALTER TABLE pgcrew.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON pgcrew.%I '
                       'USING (tenant_id = pgcrew.current_tenant()) '
                       'WITH CHECK (tenant_id = pgcrew.current_tenant())', t);
    END LOOP;
    FOR t IN
        SELECT c.table_name FROM information_schema.columns c
        JOIN information_schema.tables tb
          ON tb.table_schema = c.table_schema AND tb.table_name = c.table_name
        WHERE c.table_schema = 'pgcrew' AND c.column_name = 'run_id'
          AND tb.table_type = 'BASE TABLE'
          AND NOT EXISTS (SELECT 1 FROM information_schema.columns x
                          WHERE x.table_schema = 'pgcrew' AND x.table_name = c.table_name
                            AND x.column_name = 'tenant_id')
        ORDER BY 1
    LOOP
        EXECUTE format('ALTER TABLE pgcrew.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON pgcrew.%I '
                       'USING (EXISTS (SELECT 1 FROM pgcrew.runs r WHERE r.id = run_id '
                       'AND r.tenant_id = pgcrew.current_tenant())) '
                       'WITH CHECK (EXISTS (SELECT 1 FROM pgcrew.runs r WHERE r.id = run_id '
                       'AND r.tenant_id = pgcrew.current_tenant()))', t);
    END LOOP;
END $$;

-- Grant a (non-owner) role read access to the tenant-scoped tables and views; RLS limits what
-- it sees to the tenant in its `pgcrew.tenant_id` setting. Returns the objects granted.
CREATE FUNCTION pgcrew.grant_tenant_access(role_name text) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA pgcrew TO %I', role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgcrew.current_tenant() TO %I', role_name);
    FOR t IN
        SELECT c.relname
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'pgcrew'
          AND ((c.relkind = 'r' AND c.relrowsecurity)
               OR (c.relkind = 'v' AND c.relname IN ('tenant_costs', 'budget_status')))
        ORDER BY c.relname
    LOOP
        EXECUTE format('GRANT SELECT ON pgcrew.%I TO %I', t, role_name);
        RETURN NEXT t;
    END LOOP;
END $$;
