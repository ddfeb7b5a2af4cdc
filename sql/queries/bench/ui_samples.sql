-- `pgcrew bench ui`: a run, a task and a tenant to open.
SELECT (SELECT id FROM pgcrew.runs WHERE state = 'completed' LIMIT 1)::text,
       (SELECT max(id) FROM pgcrew.tasks)::int8
