-- Summaries of a run, newest first, optionally of one type.
SELECT id, run_id, summary_type, content_text, content_json, created_at
FROM pgcrew.summaries
WHERE run_id = $1 AND ($2::text IS NULL OR summary_type = $2)
ORDER BY id DESC
LIMIT $3
