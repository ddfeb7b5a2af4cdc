-- One bounded retention pass over finished runs older than $1 microseconds ($2 runs at most).
SELECT o_run, o_events, o_artifacts, o_summaries, o_checkpoints, o_cost_entries
FROM pgcrew.retain_finished_runs($1::int8, $2::int4)
