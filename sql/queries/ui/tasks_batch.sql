-- The next batch of task ids matching the console's task filter (see ui/tasks.sql) after id
-- $6, in id order: bulk actions walk the matches in bounded batches.
SELECT id
  FROM pgcrew.tasks
 WHERE ($1::text IS NULL OR queue = $1)
   AND ($2::text IS NULL OR state = $2)
   AND ($3::text IS NULL OR tenant_id = $3)
   AND ($4::text IS NULL OR kind = $4)
   AND ($5::jsonb IS NULL OR payload @> $5)
   AND id > $6
 ORDER BY id
 LIMIT $7
