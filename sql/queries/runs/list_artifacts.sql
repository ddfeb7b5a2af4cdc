-- The latest version of every artifact of a run.
SELECT DISTINCT ON (key) run_id, key, version, value, created_at
FROM pgcrew.artifacts
WHERE run_id = $1
ORDER BY key, version DESC
