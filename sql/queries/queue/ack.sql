SELECT id, state FROM pgcrew.ack_tasks($1, $2, $3, $4, $5)
