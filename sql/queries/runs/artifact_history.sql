SELECT run_id, key, version, value, created_at
FROM pgcrew.artifacts
WHERE run_id = $1 AND key = $2
ORDER BY version
