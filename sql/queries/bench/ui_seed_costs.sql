-- `pgcrew bench ui`: $1 cost entries over tenants bench-0..bench-9, two models and two
-- categories, spread over the last 14 days.
INSERT INTO pgcrew.cost_entries (tenant_id, category, model, prompt_tokens, completion_tokens,
                                 cost_usd, created_at)
SELECT 'bench-' || (g % 10), CASE WHEN g % 5 = 0 THEN 'tool' ELSE 'llm' END,
       CASE WHEN g % 2 = 0 THEN 'gpt-4o-mini' ELSE 'gpt-4o' END, 100, 20, 0.0001,
       now() - (g % 14) * interval '1 day'
  FROM generate_series(1, $1::int) g
