-- Of the given runs, those that are finished or asked to cancel.
SELECT id, state, cancel_reason
FROM pgcrew.runs
WHERE id = ANY($1) AND (state IN ('completed', 'failed', 'cancelled') OR cancel_requested_at IS NOT NULL)
