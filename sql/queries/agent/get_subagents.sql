-- An agent's sub-agents in definition order.
SELECT subagent, budget_usd::float8 AS budget_usd
FROM pgcrew.agent_subagents
WHERE agent = $1
ORDER BY position, subagent
