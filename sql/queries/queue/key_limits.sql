-- Every key limit (V028), by queue.
SELECT queue, key_field, max_running FROM pgcrew.queue_key_limits ORDER BY queue
