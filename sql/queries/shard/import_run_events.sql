SELECT pgcrew.import_run_events($1)
