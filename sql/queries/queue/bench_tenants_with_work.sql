-- `pgcrew bench scale`: how many tenants have available tasks in queue 'default' (a loose index
-- scan over tasks_available_idx, one probe per tenant, as pgcrew.claim_tasks does).
WITH RECURSIVE act(tid) AS (
    (SELECT a.tenant_id FROM pgcrew.tasks a
      WHERE a.state = 'available' AND a.queue = 'default'
      ORDER BY a.tenant_id LIMIT 1)
    UNION ALL
    SELECT (SELECT a.tenant_id FROM pgcrew.tasks a
             WHERE a.state = 'available' AND a.queue = 'default' AND a.tenant_id > act.tid
             ORDER BY a.tenant_id LIMIT 1)
      FROM act WHERE act.tid IS NOT NULL)
SELECT count(*) FROM act WHERE act.tid IS NOT NULL
