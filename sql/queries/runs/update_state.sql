-- Apply a run state transition with its outcome fields (checked by the caller and the trigger);
-- the run afterwards.
UPDATE pgcrew.runs
SET state = $2,
    instance_id = coalesce($3, instance_id),
    response_text = coalesce($4, response_text),
    stop_reason = coalesce($5, stop_reason),
    input_tokens = input_tokens + $6,
    output_tokens = output_tokens + $7,
    cost_usd = cost_usd + $8::float8::numeric,
    error_type = coalesce($9, error_type),
    error_message = coalesce($10, error_message),
    cancel_reason = coalesce($11, cancel_reason),
    cancel_requested_at = CASE WHEN $2 = 'cancelled' THEN now() ELSE cancel_requested_at END,
    started_at = CASE WHEN $2 = 'running' THEN coalesce(started_at, now()) ELSE started_at END,
    finalized_at = CASE WHEN $2 IN ('completed', 'failed', 'cancelled') THEN now() ELSE finalized_at END,
    lease_owner = CASE WHEN $2 IN ('completed', 'failed', 'cancelled') THEN NULL ELSE lease_owner END,
    lease_expires_at = CASE WHEN $2 IN ('completed', 'failed', 'cancelled') THEN NULL ELSE lease_expires_at END,
    updated_at = now()
WHERE id = $1
RETURNING id, tenant_id, session_id, agent_name, state, prompt, response_text, stop_reason,
       input_tokens, output_tokens, cost_usd::float8 AS cost_usd, error_message, error_type,
       instance_id, lease_owner, lease_token, lease_expires_at, parent_run_id, forked_at_seq,
       metadata, cancel_requested_at, cancel_reason, created_at, started_at, finalized_at,
       (lease_owner IS NOT NULL AND lease_expires_at > now()) AS lease_valid
