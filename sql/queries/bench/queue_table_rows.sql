-- `pgcrew bench scale`: rows in the tasks table (every state).
SELECT count(*) FROM pgcrew.tasks
