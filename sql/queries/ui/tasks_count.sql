-- How many tasks match the console's task filter (see ui/tasks.sql), for bulk confirmations.
SELECT count(*)
  FROM pgcrew.tasks
 WHERE ($1::text IS NULL OR queue = $1)
   AND ($2::text IS NULL OR state = $2)
   AND ($3::text IS NULL OR tenant_id = $3)
   AND ($4::text IS NULL OR kind = $4)
   AND ($5::jsonb IS NULL OR payload @> $5)
