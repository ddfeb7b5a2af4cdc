-- Create or replace a tenant's configuration (accounting columns are left alone).
INSERT INTO pgcrew.tenants AS t (id, capabilities, budget_usd_limit, max_concurrent_runs,
                                 max_concurrent_tasks, warning_threshold, critical_threshold,
                                 degradation_policy)
VALUES ($1, $2, pgcrew.money_amount($3::float8, 'budget_usd_limit'), $4, $5, $6::float8::numeric, $7::float8::numeric, $8)
ON CONFLICT (id) DO UPDATE
SET capabilities         = EXCLUDED.capabilities,
    budget_usd_limit     = EXCLUDED.budget_usd_limit,
    max_concurrent_runs  = EXCLUDED.max_concurrent_runs,
    max_concurrent_tasks = EXCLUDED.max_concurrent_tasks,
    warning_threshold    = EXCLUDED.warning_threshold,
    critical_threshold   = EXCLUDED.critical_threshold,
    degradation_policy   = EXCLUDED.degradation_policy,
    updated_at           = now()
RETURNING (t.xmax = 0) AS inserted
