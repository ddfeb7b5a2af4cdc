-- One durable wait step (pgcrew.wait_step, V020): the outcome, the signal's payload, the deadline,
-- and the time left until it (microseconds, database time).
SELECT o_outcome, o_payload, o_deadline,
       greatest(0, (extract(epoch FROM (o_deadline - now())) * 1000000)::int8) AS left_us
  FROM pgcrew.wait_step($1::uuid, $2::int8, $3::text, $4::text, $5::int8, $6::jsonb)
