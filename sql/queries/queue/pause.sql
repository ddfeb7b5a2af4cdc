-- Pause a queue ($2 NULL: for every tenant) (V028). Returns whether it was newly paused.
SELECT pgcrew.pause_queue($1, $2)
