-- One agent definition by name, with its sub-agents in definition order (names and budgets,
-- as agent/get_subagents) in the same read.
SELECT a.name, a.description, a.model, a.system_prompt, a.tools, a.max_tokens, a.temperature,
       a.max_iterations, a.on_capability_denied, a.replay_policy, a.skills,
       coalesce(s.names, '{}') AS subagent_names, coalesce(s.budgets, '{}') AS subagent_budgets
  FROM pgcrew.agents a
  LEFT JOIN LATERAL (
      SELECT array_agg(x.subagent ORDER BY x.position, x.subagent) AS names,
             array_agg(x.budget_usd::float8 ORDER BY x.position, x.subagent) AS budgets
        FROM pgcrew.agent_subagents x
       WHERE x.agent = a.name) s ON true
 WHERE a.name = $1
