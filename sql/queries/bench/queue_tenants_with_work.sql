-- `pgcrew bench scale`: how many tenants have available tasks in queue 'default'.
SELECT count(DISTINCT tenant_id) FROM pgcrew.tasks WHERE state = 'available' AND queue = 'default'
