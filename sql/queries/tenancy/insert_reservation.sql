INSERT INTO pgcrew.budget_reservations (id, tenant_id, run_id, instance_id, model, amount_usd)
VALUES ($1, $2, $3, $4, $5, pgcrew.money_amount($6::float8, 'estimate_usd'))
RETURNING amount_usd::float8 AS amount_usd, created_at
