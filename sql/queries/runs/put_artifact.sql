-- Store a new version of an artifact (pgcrew.put_artifact locks and checks the run: PC002
-- unknown, PC041 finished, PC001 lease not held; PC040 value over the hard cap).
SELECT run_id, key, version, value, created_at
FROM pgcrew.put_artifact($1::uuid, $2::int8, $3::text, $4::jsonb)
