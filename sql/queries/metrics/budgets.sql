-- /metrics cluster gauges: each tenant's budget use (spent / limit; NULL without a limit) and
-- status.
SELECT t.id AS tenant_id,
       CASE WHEN t.budget_usd_limit IS NULL OR t.budget_usd_limit = 0 THEN NULL
            ELSE (t.spent_usd / t.budget_usd_limit)::float8 END AS used_ratio,
       t.budget_status AS status
  FROM pgcrew.tenants t
 ORDER BY t.id
