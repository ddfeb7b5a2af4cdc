WITH a AS (DELETE FROM pgcrew.instance_agents WHERE instance_id = $1)
DELETE FROM pgcrew.instance_tools WHERE instance_id = $1
