-- Start or resume run $1 (state $2, `running`; checked by the caller and the trigger) on
-- instance $3 (kept when NULL); the run afterwards. Terminal transitions are pgcrew.finish_run.
UPDATE pgcrew.runs
SET state = $2,
    instance_id = coalesce($3, instance_id),
    started_at = CASE WHEN $2 = 'running' THEN coalesce(started_at, now()) ELSE started_at END,
    updated_at = now()
WHERE id = $1
RETURNING id, tenant_id, session_id, agent_name, state, prompt, response_text, stop_reason,
       input_tokens, output_tokens, cost_usd::float8 AS cost_usd, error_message, error_type,
       instance_id, lease_owner, lease_token, lease_expires_at, parent_run_id, forked_at_seq,
       metadata, cancel_requested_at, cancel_reason, created_at, started_at, finalized_at,
       (lease_owner IS NOT NULL AND lease_expires_at > now()) AS lease_valid
