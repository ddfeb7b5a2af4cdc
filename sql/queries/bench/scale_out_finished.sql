-- Tasks of a queue that are finished (completed, discarded or cancelled).
SELECT count(*)::bigint FROM pgcrew.tasks
 WHERE queue = $1 AND state IN ('completed', 'discarded', 'cancelled')
