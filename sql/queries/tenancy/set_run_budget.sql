UPDATE pgcrew.runs
SET budget_usd_limit = pgcrew.money_amount($3::float8, 'run budget_usd_limit')
WHERE id = $1 AND tenant_id = $2
RETURNING id
