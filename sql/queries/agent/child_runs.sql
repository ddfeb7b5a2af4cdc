-- The sub-agent runs of a parent, oldest first.
SELECT id, parent_step_key, agent_name, state, subagent_depth AS depth,
       carved_budget_usd::float8 AS budget_usd, budget_spent_usd::float8 AS spent_usd,
       response_text, error_type, error_message
FROM pgcrew.runs
WHERE parent_run_id = $1 AND parent_relation = 'subagent'
ORDER BY created_at, id
