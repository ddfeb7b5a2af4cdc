-- Start (or find) the sub-agent run of a parent's tool step: see pgcrew.start_child_run (V021).
SELECT child_id, created, budget_usd, depth
FROM pgcrew.start_child_run($1::uuid, $2::text, $3::text, $4::text, $5::float8, $6::integer)
