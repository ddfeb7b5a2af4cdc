-- A task's state and the time from its creation to its claim (database clock), in ms.
SELECT state, extract(epoch FROM claimed_at - created_at)::float8 * 1000
  FROM pgcrew.tasks WHERE id = $1
