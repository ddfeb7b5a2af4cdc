SELECT t.id,
       t.capabilities,
       t.budget_usd_limit::float8 AS budget_usd_limit,
       t.spent_usd::float8 AS spent_usd,
       t.reserved_usd::float8 AS reserved_usd,
       t.max_concurrent_runs,
       t.max_concurrent_tasks,
       t.warning_threshold::float8 AS warning_threshold,
       t.critical_threshold::float8 AS critical_threshold,
       t.budget_status,
       t.degradation_policy,
       t.metadata,
       t.created_at,
       t.updated_at,
       (SELECT count(*) FROM pgcrew.budget_reservations r WHERE r.tenant_id = t.id) AS active_reservations
FROM pgcrew.tenants t
WHERE t.id = $1
