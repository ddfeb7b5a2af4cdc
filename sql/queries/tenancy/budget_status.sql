SELECT tenant_id,
       budget_usd_limit::float8 AS budget_usd_limit,
       spent_usd::float8 AS spent_usd,
       reserved_usd::float8 AS reserved_usd,
       remaining_usd::float8 AS remaining_usd,
       used_pct::float8 AS used_pct,
       status,
       warning_threshold::float8 AS warning_threshold,
       critical_threshold::float8 AS critical_threshold,
       active_reservations
FROM pgcrew.budget_status
WHERE tenant_id = $1
