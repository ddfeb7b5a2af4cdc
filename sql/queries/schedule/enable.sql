-- Enable ($2 true) or disable a schedule (V028); returns whether it changed. PC102: unknown.
SELECT pgcrew.set_schedule_enabled($1, $2)
