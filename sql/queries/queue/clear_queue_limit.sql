DELETE FROM pgcrew.tenant_queue_limits WHERE tenant_id = $1 AND queue = $2
