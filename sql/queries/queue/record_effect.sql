INSERT INTO pgcrew_task_effects (task_id, instance_id) VALUES ($1, $2)
