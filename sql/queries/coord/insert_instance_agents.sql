INSERT INTO pgcrew.instance_agents (instance_id, agent_name)
SELECT $1, a FROM unnest($2::text[]) AS a
ON CONFLICT DO NOTHING
