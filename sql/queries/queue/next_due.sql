-- How long until the next scheduled or retryable task of the queues $1 is due, or (V031) until
-- a rate limit that may hold back their available work has a whole token again (a queue
-- bucket of theirs, or any kind or tenant bucket, while it has less than one token): an idle
-- pool sleeps until then instead of its poll interval, on every instance. NULL: neither.
-- The read itself is pgcrew.next_due_in (V043: planned once per connection, not per call).
SELECT pgcrew.next_due_in($1::text[]) AS due_in_us
