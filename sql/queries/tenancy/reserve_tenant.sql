-- The budget check and the reservation in ONE conditional UPDATE: concurrent reservations of the
-- same tenant serialise on the row and each re-checks the condition against the latest version.
UPDATE pgcrew.tenants
SET reserved_usd = reserved_usd + pgcrew.money_amount($2::float8, 'estimate_usd'),
    updated_at = now()
WHERE id = $1
  AND (budget_usd_limit IS NULL
       OR spent_usd + reserved_usd + pgcrew.money_amount($2::float8, 'estimate_usd') <= budget_usd_limit)
RETURNING spent_usd::float8 AS spent_usd, reserved_usd::float8 AS reserved_usd
