SELECT tenant_id, COALESCE(SUM((payload ->> 'cost_usd')::double precision), 0.0) AS spend
FROM pgcrew.events
WHERE event_type = 'model_completed'
GROUP BY tenant_id
ORDER BY tenant_id
