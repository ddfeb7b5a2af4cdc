SELECT budget_usd_limit::float8 AS limit_usd, budget_spent_usd::float8 AS spent_usd,
       budget_reserved_usd::float8 AS reserved_usd
FROM pgcrew.runs
WHERE id = $1 AND tenant_id = $2
