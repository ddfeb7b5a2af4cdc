DELETE FROM pgcrew.artifacts WHERE run_id = $1
