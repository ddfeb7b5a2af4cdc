-- Tokens and cost of a run's own model calls (events copied into a fork are excluded).
SELECT coalesce(sum((payload->'usage'->>'prompt_tokens')::int8), 0)::int8 AS input_tokens,
       coalesce(sum((payload->'usage'->>'completion_tokens')::int8), 0)::int8 AS output_tokens,
       coalesce(sum((payload->>'cost_usd')::float8), 0)::float8 AS cost_usd
  FROM pgcrew.events
 WHERE run_id = $1 AND event_type = 'model_completed' AND NOT payload ? 'copied_from_seq'
