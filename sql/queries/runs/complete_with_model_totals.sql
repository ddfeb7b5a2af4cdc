-- Complete run $1 under lease token $2 with response $3 and stop reason $4, its tokens and cost
-- summed from its own `model_completed` events (as kernel/run_model_totals: events copied into
-- a fork are excluded) in the same statement (pgcrew.finish_run, V025); the run afterwards, with
-- the head to sign.
SELECT f.id, f.tenant_id, f.session_id, f.agent_name, f.state, f.prompt, f.response_text,
       f.stop_reason, f.input_tokens, f.output_tokens, f.cost_usd::float8 AS cost_usd,
       f.error_message, f.error_type, f.instance_id, f.lease_owner, f.lease_token,
       f.lease_expires_at, f.parent_run_id, f.forked_at_seq, f.metadata, f.cancel_requested_at,
       f.cancel_reason, f.created_at, f.started_at, f.finalized_at,
       (f.lease_owner IS NOT NULL AND f.lease_expires_at > now()) AS lease_valid,
       f.ledger_head_seq, f.ledger_head_hash
FROM (SELECT coalesce(sum((payload->'usage'->>'prompt_tokens')::int8), 0)::int8 AS input_tokens,
             coalesce(sum((payload->'usage'->>'completion_tokens')::int8), 0)::int8 AS output_tokens,
             coalesce(sum((payload->>'cost_usd')::float8), 0)::float8 AS cost_usd
        FROM pgcrew.events
       WHERE run_id = $1::uuid AND event_type = 'model_completed'
         AND NOT payload ? 'copied_from_seq') t,
     LATERAL pgcrew.finish_run($1::uuid, 'completed', $2::int8,
                               jsonb_build_object('stop_reason', $4::text,
                                                  'input_tokens', t.input_tokens,
                                                  'output_tokens', t.output_tokens,
                                                  'cost_usd', t.cost_usd),
                               NULL, $3::text, $4::text, t.input_tokens, t.output_tokens,
                               t.cost_usd, NULL, NULL, NULL) f
