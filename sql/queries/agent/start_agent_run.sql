-- Start pending agent run $1 under lease token $2 on instance $3 with event details $4
-- (pgcrew.start_run_fenced, V040) and read its agent's definition (as agent/get_agent) in the
-- same statement: the run afterwards and the definition's columns (NULL `name` when the agent
-- is not registered). PC180 (DETAIL `running,limit,tenant`) when the tenant is at its limit.
SELECT r.id, r.tenant_id, r.session_id, r.agent_name, r.state, r.prompt, r.response_text,
       r.stop_reason, r.input_tokens, r.output_tokens, r.cost_usd::float8 AS cost_usd,
       r.error_message, r.error_type, r.instance_id, r.lease_owner, r.lease_token,
       r.lease_expires_at, r.parent_run_id, r.forked_at_seq, r.metadata, r.cancel_requested_at,
       r.cancel_reason, r.created_at, r.started_at, r.finalized_at,
       (r.lease_owner IS NOT NULL AND r.lease_expires_at > now()) AS lease_valid,
       a.name, a.description, a.model, a.system_prompt, a.tools, a.max_tokens, a.temperature,
       a.max_iterations, a.on_capability_denied, a.replay_policy, a.skills,
       coalesce(s.names, '{}') AS subagent_names, coalesce(s.budgets, '{}') AS subagent_budgets
  FROM pgcrew.start_run_fenced($1::uuid, $2::int8, $3::text, $4::jsonb) r
  LEFT JOIN pgcrew.agents a ON a.name = r.agent_name
  LEFT JOIN LATERAL (
      SELECT array_agg(x.subagent ORDER BY x.position, x.subagent) AS names,
             array_agg(x.budget_usd::float8 ORDER BY x.position, x.subagent) AS budgets
        FROM pgcrew.agent_subagents x
       WHERE x.agent = a.name) s ON true
