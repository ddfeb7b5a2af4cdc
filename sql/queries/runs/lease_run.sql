-- Take run $1's lease for owner $2 for $3 microseconds and, when it waits and its wait has
-- resolved, resume it on instance $4 (pgcrew.lease_run, V025): the run afterwards; no row for an
-- unknown run. The lease is not the caller's when lease_owner is another owner's or the run is
-- finished.
SELECT id, tenant_id, session_id, agent_name, state, prompt, response_text, stop_reason,
       input_tokens, output_tokens, cost_usd::float8 AS cost_usd, error_message, error_type,
       instance_id, lease_owner, lease_token, lease_expires_at, parent_run_id, forked_at_seq,
       metadata, cancel_requested_at, cancel_reason, created_at, started_at, finalized_at,
       (lease_owner IS NOT NULL AND lease_expires_at > now()) AS lease_valid
FROM pgcrew.lease_run($1::uuid, $2::text, $3::int8, $4::text)
