-- The writes of a submit (pgcrew.create_agent_run, V019): the run, its run_created event and
-- the agent-run task on the agent's queue.
SELECT pgcrew.create_agent_run($1, $2, $3, $4)
