-- `pgcrew bench agents`: the phase's runs (its own tenant $1) by outcome: completed, other,
-- and the first error of the others (state, error type and message).
SELECT count(*) FILTER (WHERE state = 'completed'),
       count(*) FILTER (WHERE state <> 'completed'),
       min(state || ': ' || coalesce(error_type, '') || ' ' || coalesce(error_message, stop_reason, ''))
           FILTER (WHERE state <> 'completed')
  FROM pgcrew.runs
 WHERE tenant_id = $1
