-- `pgcrew bench scale`: available tasks in queue 'default'.
SELECT count(*) FROM pgcrew.tasks WHERE state = 'available' AND queue = 'default'
