-- Submit a run of an agent from its input (pgcrew.submit_run, V019): validated, session
-- created when missing, run + run_created event + agent-run task in the caller's transaction.
SELECT pgcrew.submit_run(p_agent => $1, p_tenant => $2, p_session => $3, p_input => $4)
