-- Park a schedule the leader cannot evaluate (an expression written by hand that does not
-- parse) until $2, so it is not retried on every tick.
UPDATE pgcrew.schedules SET next_fire_at = $2 WHERE name = $1
