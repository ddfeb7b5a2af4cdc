-- `pgcrew bench ui`: $1 runs over tenants bench-0..bench-9 and five agents, one in a hundred
-- pending, the rest completed, created one every 5 s back from now(); then $2 ledger events
-- spread evenly over them (placeholder hashes: the bench measures reads, not chains).
WITH r AS (
    INSERT INTO pgcrew.runs (id, tenant_id, agent_name, state, created_at, started_at, finalized_at)
    SELECT gen_random_uuid(), 'bench-' || (g % 10), 'agent-' || (g % 5),
           CASE WHEN g % 100 = 0 THEN 'pending' ELSE 'completed' END,
           now() - g * interval '5 seconds',
           CASE WHEN g % 100 = 0 THEN NULL ELSE now() - g * interval '5 seconds' END,
           CASE WHEN g % 100 = 0 THEN NULL ELSE now() - g * interval '5 seconds' + interval '3 seconds' END
      FROM generate_series(1, $1::int) g
    RETURNING id, tenant_id
), numbered AS (
    SELECT id, tenant_id, row_number() OVER () - 1 AS n FROM r
)
INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, step_key, payload, prev_hash, hash, created_at)
SELECT nb.id, e.g / $1::int + 1, nb.tenant_id,
       CASE WHEN e.g / $1::int % 2 = 0 THEN 'model_completed' ELSE 'tool_completed' END,
       'step-' || (e.g / $1::int),
       jsonb_build_object('model', 'gpt-4o-mini', 'usage',
                          jsonb_build_object('prompt_tokens', 100, 'completion_tokens', 20),
                          'cost_usd', 0.0001),
       '\x00'::bytea, '\x00'::bytea, now() - (e.g * interval '1 millisecond')
  FROM generate_series(0, $2::int - 1) e(g)
  JOIN numbered nb ON nb.n = e.g % $1::int
