SELECT budget_usd_limit::float8 AS limit_usd, spent_usd::float8 AS spent_usd, reserved_usd::float8 AS reserved_usd
FROM pgcrew.tenants
WHERE id = $1
