-- Finish run $1 in state $2 under lease token $3 (pgcrew.finish_run, V025): the event with
-- details $4 plus {from, to}, the outcome fields $5.. $13 and the new ledger head, in one
-- statement; the run afterwards, with the head to sign.
SELECT id, tenant_id, session_id, agent_name, state, prompt, response_text, stop_reason,
       input_tokens, output_tokens, cost_usd::float8 AS cost_usd, error_message, error_type,
       instance_id, lease_owner, lease_token, lease_expires_at, parent_run_id, forked_at_seq,
       metadata, cancel_requested_at, cancel_reason, created_at, started_at, finalized_at,
       (lease_owner IS NOT NULL AND lease_expires_at > now()) AS lease_valid,
       ledger_head_seq, ledger_head_hash
FROM pgcrew.finish_run($1::uuid, $2::text, $3::int8, $4::jsonb, $5::text, $6::text, $7::text,
                       $8::int8, $9::int8, $10::float8, $11::text, $12::text, $13::text)
