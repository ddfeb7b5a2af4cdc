-- Add a summary (pgcrew.add_summary locks and checks the run: PC002 unknown, PC041 finished,
-- PC001 lease not held; PC040 content over the hard cap).
SELECT id, run_id, summary_type, content_text, content_json, created_at
FROM pgcrew.add_summary($1::uuid, $2::int8, $3::text, $4::text, $5::jsonb)
