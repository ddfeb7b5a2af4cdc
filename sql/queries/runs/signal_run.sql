-- Send a signal to a run (validated and woken by pgcrew.signal_run, V020).
SELECT pgcrew.signal_run($1::uuid, $2::text, $3::jsonb)
