-- Try to take the leases of runs $1 (with their tasks' tenants $2) for owner $3 for $4
-- microseconds, resuming runs whose wait resolved on instance $5, never waiting for a run's lock
-- (pgcrew.lease_runs, V029): the rows of the runs it locked; the lease is the caller's where
-- lease_owner = $3 and the run is not finished.
SELECT id, tenant_id, session_id, agent_name, state, prompt, response_text, stop_reason,
       input_tokens, output_tokens, cost_usd::float8 AS cost_usd, error_message, error_type,
       instance_id, lease_owner, lease_token, lease_expires_at, parent_run_id, forked_at_seq,
       metadata, cancel_requested_at, cancel_reason, created_at, started_at, finalized_at,
       (lease_owner IS NOT NULL AND lease_expires_at > now()) AS lease_valid
FROM pgcrew.lease_runs($1::uuid[], $2::text[], $3::text, $4::int8, $5::text)
