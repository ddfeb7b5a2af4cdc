SELECT pgcrew.export_run_events($1)
