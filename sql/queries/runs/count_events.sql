SELECT count(*) FROM pgcrew.events WHERE run_id = $1
