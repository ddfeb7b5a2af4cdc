SELECT pgcrew.release_run_lease($1::uuid, $2::text, $3::int8)
