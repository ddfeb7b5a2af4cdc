-- Record that $4 paused or resumed ($3) queue $1 (tenant $2, NULL: every tenant); $5: whether
-- it changed anything.
INSERT INTO pgcrew.queue_pause_events (queue, tenant_id, action, actor, changed)
VALUES ($1, $2, $3, $4, $5)
