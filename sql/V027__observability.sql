-- V027 (#20): observability.
--
-- 1. The W3C trace context (`traceparent`) of the span that enqueued a task or created a run,
--    stored with the row so whichever instance executes it continues the same trace. The
--    columns default to the session setting `pgcrew.trace_context`, which pgcrew sets around an
--    enqueue or a submission only while OpenTelemetry tracing is on: no statement or function
--    of the enqueue path changes, and nothing is stored when tracing is off.
-- 2. The production metrics as views: per tenant, per agent (security_invoker: a tenant role
--    sees only its own tenant's figures through RLS) and per instance (operators only).

-- The default is inline (no function to grant): a well-formed traceparent or NULL. A stable
-- default is evaluated once for the existing rows (no table rewrite) and per insert for new ones.
-- No CHECK constraint: pgcrew.runs carries none (each would cost every ledger append, V015),
-- and the default only ever stores a 55-character traceparent.
ALTER TABLE pgcrew.tasks ADD COLUMN trace_context text DEFAULT (CASE WHEN current_setting('pgcrew.trace_context', true)
                            ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
                       THEN current_setting('pgcrew.trace_context', true) END);
ALTER TABLE pgcrew.runs ADD COLUMN trace_context text DEFAULT (CASE WHEN current_setting('pgcrew.trace_context', true)
                            ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
                       THEN current_setting('pgcrew.trace_context', true) END);

-- ---------------------------------------------------------------------------------------------
-- Per tenant
-- ---------------------------------------------------------------------------------------------

-- One row per tenant: runs, average cost per finished run, budget utilization, concurrency.
-- A run's cost is what was charged to it (budget_spent_usd) or recorded when it finished
-- (cost_usd), whichever is larger.
CREATE VIEW pgcrew.tenant_metrics WITH (security_invoker = true) AS
SELECT t.id AS tenant_id,
       coalesce(r.runs, 0) AS runs,
       coalesce(r.finished_runs, 0) AS finished_runs,
       coalesce(r.completed_runs, 0) AS completed_runs,
       coalesce(r.failed_runs, 0) AS failed_runs,
       coalesce(r.total_cost_usd, 0)::numeric(20, 10) AS total_cost_usd,
       CASE WHEN coalesce(r.finished_runs, 0) = 0 THEN NULL
            ELSE round(r.finished_cost_usd / r.finished_runs, 10) END AS avg_cost_per_run_usd,
       t.budget_usd_limit,
       t.spent_usd,
       t.reserved_usd,
       CASE WHEN t.budget_usd_limit IS NULL OR t.budget_usd_limit = 0 THEN NULL
            ELSE round((t.spent_usd + t.reserved_usd) / t.budget_usd_limit, 6) END
           AS budget_utilization,
       t.budget_status,
       coalesce(r.running_runs, 0) AS concurrent_runs,
       t.max_concurrent_runs
  FROM pgcrew.tenants t
  LEFT JOIN (
      SELECT x.tenant_id,
             count(*) AS runs,
             count(*) FILTER (WHERE x.state IN ('completed', 'failed', 'cancelled')) AS finished_runs,
             count(*) FILTER (WHERE x.state = 'completed') AS completed_runs,
             count(*) FILTER (WHERE x.state = 'failed') AS failed_runs,
             count(*) FILTER (WHERE x.state = 'running') AS running_runs,
             sum(greatest(x.cost_usd, x.budget_spent_usd)) AS total_cost_usd,
             sum(greatest(x.cost_usd, x.budget_spent_usd))
                 FILTER (WHERE x.state IN ('completed', 'failed', 'cancelled')) AS finished_cost_usd
        FROM pgcrew.runs x
       GROUP BY x.tenant_id
  ) r ON r.tenant_id = t.id;

-- Cost by tenant and category, all time (live entries plus the daily aggregate retention keeps).
CREATE VIEW pgcrew.tenant_cost_by_category WITH (security_invoker = true) AS
SELECT c.tenant_id,
       c.category,
       sum(c.entries)::bigint AS entries,
       sum(c.prompt_tokens)::bigint AS prompt_tokens,
       sum(c.completion_tokens)::bigint AS completion_tokens,
       sum(c.cost_usd) AS cost_usd
  FROM pgcrew.tenant_costs c
 GROUP BY c.tenant_id, c.category;

-- Runs ranked by cost within their tenant (filter on cost_rank for the top N).
CREATE VIEW pgcrew.tenant_top_cost_runs WITH (security_invoker = true) AS
SELECT x.tenant_id,
       x.run_id,
       x.agent_name,
       x.state,
       x.cost_usd,
       x.created_at,
       rank() OVER (PARTITION BY x.tenant_id ORDER BY x.cost_usd DESC, x.created_at) AS cost_rank
  FROM (SELECT r.tenant_id, r.id AS run_id, r.agent_name, r.state,
               greatest(r.cost_usd, r.budget_spent_usd) AS cost_usd, r.created_at
          FROM pgcrew.runs r) x;

-- ---------------------------------------------------------------------------------------------
-- Per agent (and tenant), from the runs and their ledgers
-- ---------------------------------------------------------------------------------------------

-- drift_rate: share of runs with a replay that drifted (`replayed_with_drift`);
-- fork_rate: forks of the agent's runs per run (runs with forked_at_seq, made by
-- fork_on_drift); tool_failure_rate / unknown_outcome_rate: `tool_failed` /
-- `tool_outcome_unknown` among tool outcomes (completed + failed + unknown);
-- harness_violations: `harness_unit_unclean` events (a unit left the environment unclean).
CREATE VIEW pgcrew.agent_metrics WITH (security_invoker = true) AS
WITH per_run AS (
    SELECT e.run_id,
           count(*) FILTER (WHERE e.event_type = 'replayed_with_drift') AS drifts,
           count(*) FILTER (WHERE e.event_type = 'tool_requested') AS tool_requests,
           count(*) FILTER (WHERE e.event_type = 'tool_completed') AS tool_completed,
           count(*) FILTER (WHERE e.event_type = 'tool_failed') AS tool_failed,
           count(*) FILTER (WHERE e.event_type = 'tool_outcome_unknown') AS tool_unknown,
           count(*) FILTER (WHERE e.event_type = 'harness_unit_unclean') AS unclean
      FROM pgcrew.events e
     WHERE e.event_type IN ('replayed_with_drift', 'tool_requested', 'tool_completed',
                            'tool_failed', 'tool_outcome_unknown', 'harness_unit_unclean')
     GROUP BY e.run_id
), runs AS (
    SELECT r.tenant_id,
           coalesce(r.agent_name, '') AS agent_name,
           r.forked_at_seq IS NOT NULL AS is_fork,
           coalesce(p.drifts, 0) AS drifts,
           coalesce(p.tool_requests, 0) AS tool_requests,
           coalesce(p.tool_completed, 0) AS tool_completed,
           coalesce(p.tool_failed, 0) AS tool_failed,
           coalesce(p.tool_unknown, 0) AS tool_unknown,
           coalesce(p.unclean, 0) AS unclean
      FROM pgcrew.runs r
      LEFT JOIN per_run p ON p.run_id = r.id
)
SELECT x.tenant_id,
       x.agent_name,
       count(*) AS runs,
       count(*) FILTER (WHERE x.drifts > 0) AS runs_with_drift,
       round(count(*) FILTER (WHERE x.drifts > 0)::numeric / count(*), 6) AS drift_rate,
       count(*) FILTER (WHERE x.is_fork) AS forks,
       round(count(*) FILTER (WHERE x.is_fork)::numeric / count(*), 6) AS fork_rate,
       sum(x.tool_requests)::bigint AS tool_calls,
       sum(x.tool_failed)::bigint AS tool_failures,
       sum(x.tool_unknown)::bigint AS tool_unknown_outcomes,
       CASE WHEN sum(x.tool_completed + x.tool_failed + x.tool_unknown) = 0 THEN NULL
            ELSE round(sum(x.tool_failed)
                       / sum(x.tool_completed + x.tool_failed + x.tool_unknown), 6) END
           AS tool_failure_rate,
       CASE WHEN sum(x.tool_completed + x.tool_failed + x.tool_unknown) = 0 THEN NULL
            ELSE round(sum(x.tool_unknown)
                       / sum(x.tool_completed + x.tool_failed + x.tool_unknown), 6) END
           AS unknown_outcome_rate,
       sum(x.unclean)::bigint AS harness_violations
  FROM runs x
 GROUP BY x.tenant_id, x.agent_name;

-- ---------------------------------------------------------------------------------------------
-- Per instance (operators: tasks of every tenant; not granted to tenant roles)
-- ---------------------------------------------------------------------------------------------

-- Tasks finished by each live instance among the tasks still retained (claimed_by is the
-- instance of the last attempt): executed (completed or discarded), success rate, throughput
-- over its uptime and over the last minute, and uptime.
CREATE VIEW pgcrew.instance_metrics AS
SELECT i.id AS instance_id,
       i.hostname,
       i.pid,
       i.version,
       i.created_at AS started_at,
       extract(epoch FROM now() - i.created_at)::float8 AS uptime_s,
       extract(epoch FROM now() - i.last_heartbeat_at)::float8 AS heartbeat_age_s,
       coalesce(t.executed, 0) AS tasks_executed,
       coalesce(t.succeeded, 0) AS tasks_succeeded,
       coalesce(t.running, 0) AS tasks_running,
       CASE WHEN coalesce(t.executed, 0) = 0 THEN NULL
            ELSE round(t.succeeded::numeric / t.executed, 6) END AS success_rate,
       round((coalesce(t.executed, 0)
              / greatest(extract(epoch FROM now() - i.created_at), 1))::numeric, 3)
           AS throughput_per_s,
       round(coalesce(t.last_minute, 0) / 60.0, 3) AS throughput_last_minute_per_s
  FROM pgcrew.instances i
  LEFT JOIN (
      SELECT x.claimed_by,
             count(*) FILTER (WHERE x.state IN ('completed', 'discarded')) AS executed,
             count(*) FILTER (WHERE x.state = 'completed') AS succeeded,
             count(*) FILTER (WHERE x.state = 'running') AS running,
             count(*) FILTER (WHERE x.state IN ('completed', 'discarded')
                                AND x.finalized_at > now() - interval '1 minute') AS last_minute
        FROM pgcrew.tasks x
       WHERE x.claimed_by IS NOT NULL
       GROUP BY x.claimed_by
  ) t ON t.claimed_by = i.id;

-- ---------------------------------------------------------------------------------------------
-- Tenant roles read the tenant and agent views (RLS applies through security_invoker).
-- grant_tenant_access is V019's with those views added to the list; roles bound before this
-- migration get them now.
-- ---------------------------------------------------------------------------------------------
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
           AND (p.proname IN ('current_tenant', 'verify_run_chain', 'ledger_event_hash',
                              'submit_run')
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
               OR (c.relkind = 'v' AND c.relname IN ('tenant_costs', 'budget_status',
                                                     'tenant_metrics', 'tenant_cost_by_category',
                                                     'tenant_top_cost_runs', 'agent_metrics')))
        ORDER BY c.relname
    LOOP
        EXECUTE format('GRANT SELECT ON pgcrew.%I TO %I', t, role_name);
        RETURN NEXT t;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgcrew.grant_tenant_access(text) FROM PUBLIC;

DO $$
DECLARE
    r text;
    v text;
BEGIN
    FOR r IN SELECT ro.rolname FROM pgcrew.tenant_roles m JOIN pg_roles ro ON ro.oid = m.role_oid
    LOOP
        FOREACH v IN ARRAY ARRAY['tenant_metrics', 'tenant_cost_by_category',
                                 'tenant_top_cost_runs', 'agent_metrics']
        LOOP
            EXECUTE format('GRANT SELECT ON pgcrew.%I TO %I', v, r);
        END LOOP;
    END LOOP;
END $$;
