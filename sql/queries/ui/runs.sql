-- The operations console's run list: newest first, filtered by tenant, state, agent and
-- creation time (an absolute time or seconds before now()).
SELECT id, tenant_id, session_id, agent_name, state, prompt, response_text, stop_reason,
       input_tokens, output_tokens, cost_usd::float8 AS cost_usd, error_message, error_type,
       instance_id, lease_owner, lease_token, lease_expires_at, parent_run_id, forked_at_seq,
       metadata, cancel_requested_at, cancel_reason, created_at, started_at, finalized_at,
       (lease_owner IS NOT NULL AND lease_expires_at > now()) AS lease_valid
FROM pgcrew.runs
WHERE ($1::text IS NULL OR tenant_id = $1)
  AND ($2::text IS NULL OR state = $2)
  AND ($3::text IS NULL OR agent_name = $3)
  AND ($4::timestamptz IS NULL OR created_at >= $4)
  AND ($5::float8 IS NULL OR created_at >= now() - make_interval(secs => $5))
  AND ($6::timestamptz IS NULL OR created_at < $6)
  AND ($7::float8 IS NULL OR created_at < now() - make_interval(secs => $7))
ORDER BY created_at DESC, id
LIMIT $8
