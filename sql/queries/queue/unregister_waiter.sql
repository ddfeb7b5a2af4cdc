-- This pool is saturated (or stopping): no wake-ups needed.
DELETE FROM pgcrew.queue_waiters WHERE pool_id = $1
