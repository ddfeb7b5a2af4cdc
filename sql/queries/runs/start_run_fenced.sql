-- Start pending run $1 (or resume waiting run $1) under lease token $2 (when not NULL) on
-- instance $3 with event details $4 (pgcrew.start_run_fenced, V040): admission, transition and
-- lease checks, `run_started` / `run_resumed` and the row update in one statement; the run
-- afterwards. PC180 (DETAIL `running,limit,tenant`) when the tenant is at its concurrent-run limit.
SELECT id, tenant_id, session_id, agent_name, state, prompt, response_text, stop_reason,
       input_tokens, output_tokens, cost_usd::float8 AS cost_usd, error_message, error_type,
       instance_id, lease_owner, lease_token, lease_expires_at, parent_run_id, forked_at_seq,
       metadata, cancel_requested_at, cancel_reason, created_at, started_at, finalized_at,
       (lease_owner IS NOT NULL AND lease_expires_at > now()) AS lease_valid
FROM pgcrew.start_run_fenced($1::uuid, $2::int8, $3::text, $4::jsonb)
