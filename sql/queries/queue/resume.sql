-- Resume a queue ($2 NULL: the queue-wide pause) and wake its pools (V028). Returns whether a
-- pause was lifted.
SELECT pgcrew.resume_queue($1, $2)
