-- The optional per-run budget, checked and reserved like the tenant's (run row locked after the tenant row).
UPDATE pgcrew.runs
SET budget_reserved_usd = budget_reserved_usd + pgcrew.money_amount($3::float8, 'estimate_usd')
WHERE id = $1
  AND tenant_id = $2
  AND (budget_usd_limit IS NULL
       OR budget_spent_usd + budget_reserved_usd + pgcrew.money_amount($3::float8, 'estimate_usd') <= budget_usd_limit)
RETURNING id
