UPDATE pgcrew.runs
SET budget_usd_limit = round($3::float8::numeric, 10)
WHERE id = $1 AND tenant_id = $2
RETURNING id
