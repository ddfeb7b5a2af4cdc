-- Cost by tenant, day (UTC), category and model, optionally for one tenant and a day range.
SELECT tenant_id,
       day,
       category,
       model,
       entries,
       prompt_tokens,
       completion_tokens,
       cost_usd::float8 AS cost_usd
FROM pgcrew.tenant_costs
WHERE ($1::text IS NULL OR tenant_id = $1::text)
  AND ($2::date IS NULL OR day >= $2::date)
  AND ($3::date IS NULL OR day <= $3::date)
ORDER BY day, tenant_id, category, model
