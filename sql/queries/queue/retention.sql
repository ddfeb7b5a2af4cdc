WITH d AS (
    SELECT id FROM pgcrew.tasks
     WHERE state IN ('completed', 'discarded', 'cancelled')
       AND finalized_at < now() - $1::int8 * interval '1 microsecond'
     ORDER BY finalized_at
     LIMIT $2)
DELETE FROM pgcrew.tasks t USING d WHERE t.id = d.id
