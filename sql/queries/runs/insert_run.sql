INSERT INTO pgcrew.runs (id, tenant_id, session_id, agent_name, prompt, metadata, parent_run_id, forked_at_seq)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
