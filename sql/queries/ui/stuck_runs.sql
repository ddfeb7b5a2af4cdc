-- Stuck runs for the console's overview (the pgcrew.stuck_runs view).
SELECT run_id, tenant_id, agent_name, state, instance_id,
       extract(epoch FROM age)::float8 AS age_s, reason
  FROM pgcrew.stuck_runs
 ORDER BY age DESC
 LIMIT 50
