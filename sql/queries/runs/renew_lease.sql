SELECT o_expires_at FROM pgcrew.renew_run_lease($1::uuid, $2::text, $3::int8, $4::int8)
