SELECT o_token, o_expires_at, o_state FROM pgcrew.acquire_run_lease($1::uuid, $2::text, $3::int8)
