-- Which of these tasks are final, with their state and attempts.
SELECT id, state, attempts FROM pgcrew.tasks
 WHERE id = ANY($1) AND state IN ('completed', 'discarded', 'cancelled')
