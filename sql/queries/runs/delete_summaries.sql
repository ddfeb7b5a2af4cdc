DELETE FROM pgcrew.summaries WHERE run_id = $1
