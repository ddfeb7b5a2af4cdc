-- A manual fire of schedule $1 at now() (V028): its next fire is unchanged. PC102: unknown.
SELECT fire_at, task_id FROM pgcrew.fire_schedule($1, ARRAY[now()], NULL, true)
