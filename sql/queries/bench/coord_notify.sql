SELECT pg_notify('pgcrew_run_event', json_build_object('run_id', $1::uuid, 'seq', $2::int8)::text)
