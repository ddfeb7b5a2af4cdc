-- Send one batch of a run's live model output on its channel.
SELECT pg_notify($1, $2)
