SELECT queue, state, tasks, oldest_available_age_s FROM pgcrew.queue_stats ORDER BY queue, state
