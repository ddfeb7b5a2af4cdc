-- Enqueue fires $2 of schedule $1 not enqueued before and (unless $4, a manual fire) move its
-- next fire to $3 (V028). PC102: unknown schedule.
SELECT fire_at, task_id FROM pgcrew.fire_schedule($1, $2, $3, $4)
