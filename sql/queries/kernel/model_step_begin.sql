-- A model step's start in one statement (pgcrew.model_step_begin, V040): run $1, tenant $2,
-- step key $3, lease token $4, reservation id $5, instance $6, model $7, estimate $8,
-- `model_requested` payload $9. `reserved`: reserved and appended; `tenant_refused` /
-- `run_refused`: the refusing budget's figures, nothing written; `state`: the step's events
-- with the tenant's status and policy (one row per event, one with a NULL event seq when none),
-- nothing written. No row: no such tenant.
SELECT o_outcome, o_seq, o_hash, o_created_at, o_amount_usd, o_reserved_at, o_limit_usd,
       o_spent_usd, o_reserved_usd, o_budget_status, o_degradation_policy, o_event_seq,
       o_event_type, o_event_payload
FROM pgcrew.model_step_begin($1::uuid, $2::text, $3::text, $4::int8, $5::uuid, $6::text,
                             $7::text, $8::float8, $9::jsonb)
