SELECT id, state, duplicate FROM pgcrew.enqueue_task($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
