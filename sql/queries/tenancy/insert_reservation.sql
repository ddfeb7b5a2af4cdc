INSERT INTO pgcrew.budget_reservations (id, tenant_id, run_id, instance_id, model, amount_usd)
VALUES ($1, $2, $3, $4, $5, round($6::float8::numeric, 10))
RETURNING amount_usd::float8 AS amount_usd, created_at
