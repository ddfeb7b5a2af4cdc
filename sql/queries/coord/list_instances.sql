SELECT i.id,
       i.hostname,
       i.pid,
       i.version,
       i.metadata,
       i.created_at,
       i.last_heartbeat_at,
       (extract(epoch FROM now() - i.last_heartbeat_at) * 1000)::int8 AS silent_ms,
       EXISTS (SELECT 1 FROM pgcrew.leader l WHERE l.leader_id = i.id AND l.expires_at > now()) AS is_leader,
       coalesce((SELECT array_agg(agent_name ORDER BY agent_name) FROM pgcrew.instance_agents a WHERE a.instance_id = i.id), '{}') AS agents,
       coalesce((SELECT array_agg(tool_name ORDER BY tool_name) FROM pgcrew.instance_tools t WHERE t.instance_id = i.id), '{}') AS tools
FROM pgcrew.instances i
ORDER BY i.created_at, i.id
