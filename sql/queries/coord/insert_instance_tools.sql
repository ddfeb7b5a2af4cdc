INSERT INTO pgcrew.instance_tools (instance_id, tool_name)
SELECT $1, t FROM unnest($2::text[]) AS t
ON CONFLICT DO NOTHING
