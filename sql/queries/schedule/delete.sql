-- Delete a schedule and its fire records (the tasks it enqueued stay).
DELETE FROM pgcrew.schedules WHERE name = $1
