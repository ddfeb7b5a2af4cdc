-- Which of these runs are finished, with their state.
SELECT id, state FROM pgcrew.runs
 WHERE id = ANY($1) AND state IN ('completed', 'failed', 'cancelled')
