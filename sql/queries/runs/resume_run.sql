-- Resume waiting run $1 of tenant $4 (any when NULL) with lease token $2 for instance $3
-- (pgcrew.resume_run, V024): the run afterwards, unchanged when it was not waiting; no row for an
-- unknown run or another tenant's.
SELECT id, tenant_id, session_id, agent_name, state, prompt, response_text, stop_reason,
       input_tokens, output_tokens, cost_usd::float8 AS cost_usd, error_message, error_type,
       instance_id, lease_owner, lease_token, lease_expires_at, parent_run_id, forked_at_seq,
       metadata, cancel_requested_at, cancel_reason, created_at, started_at, finalized_at,
       (lease_owner IS NOT NULL AND lease_expires_at > now()) AS lease_valid
FROM pgcrew.resume_run($1::uuid, $2::int8, $3::text, $4::text)
