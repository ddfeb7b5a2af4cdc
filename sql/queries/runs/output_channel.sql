-- The secret-derived NOTIFY channel of a run's live model output.
SELECT pgcrew.run_output_channel($1)
