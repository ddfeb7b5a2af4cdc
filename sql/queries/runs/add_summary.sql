INSERT INTO pgcrew.summaries (run_id, summary_type, content_text, content_json)
VALUES ($1, $2, $3, $4)
RETURNING id, run_id, summary_type, content_text, content_json, created_at
