-- Store a new version of an artifact (the caller holds the run's lock).
INSERT INTO pgcrew.artifacts (run_id, key, version, value)
SELECT $1, $2, coalesce(max(a.version), 0) + 1, $3
FROM pgcrew.artifacts a
WHERE a.run_id = $1 AND a.key = $2
RETURNING run_id, key, version, value, created_at
