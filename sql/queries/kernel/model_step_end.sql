-- A model step's end in one statement (pgcrew.model_step_end, V040): run $1, tenant $2, step
-- key $3, lease token $4, reservation $5, cost $6 in category $7 for model $8 with $9 prompt and
-- $10 completion tokens, `model_completed` payload $11. `completed`: settled and appended;
-- `recorded`: recorded meanwhile, the reservation released; `slow`: nothing written (the
-- settlement would pass a limit, or the tenant or run is not found).
SELECT o_outcome, o_seq, o_hash, o_created_at
FROM pgcrew.model_step_end($1::uuid, $2::text, $3::text, $4::int8, $5::uuid, $6::float8,
                           $7::text, $8::text, $9::int8, $10::int8, $11::jsonb)
