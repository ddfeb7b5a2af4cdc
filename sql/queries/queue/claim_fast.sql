-- The worker pool's claim for a single queue, in one statement (no PL/pgSQL call), for the
-- common case: exactly one tenant has available work in the queue, it has no concurrency limit
-- (tenant-wide or for this queue) and no scheduled / retryable task of the queue is due. Then
-- it claims up to $2 of that tenant's tasks by priority, run_at, id, exactly as
-- pgcrew.claim_tasks would. Otherwise it claims nothing and returns one row with
-- fast = false, and the caller runs pgcrew.claim_tasks (fair shares, limits, promotion).
-- $1 queue, $2 limit, $3 claiming instance.
WITH t1 AS (
    SELECT a.tenant_id FROM pgcrew.tasks a
     WHERE a.state = 'available' AND a.queue = $1::text
     ORDER BY a.tenant_id LIMIT 1),
ok AS (
    SELECT (SELECT a.tenant_id FROM pgcrew.tasks a
             WHERE a.state = 'available' AND a.queue = $1::text
               AND a.tenant_id > (SELECT t1.tenant_id FROM t1)
             ORDER BY a.tenant_id LIMIT 1) IS NULL
       AND NOT EXISTS (SELECT 1 FROM pgcrew.tasks s
                        WHERE s.state IN ('scheduled', 'retryable') AND s.pending_deps = 0
                          AND s.queue = $1 AND s.run_at <= now())
       AND NOT EXISTS (SELECT 1 FROM pgcrew.tenants tn
                        WHERE tn.id = (SELECT t1.tenant_id FROM t1)
                          AND tn.max_concurrent_tasks IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM pgcrew.tenant_queue_limits l
                        WHERE l.tenant_id = (SELECT t1.tenant_id FROM t1) AND l.queue = $1)
           AS fast),
next AS (
    SELECT a.id FROM pgcrew.tasks a
     WHERE (SELECT ok.fast FROM ok)
       AND a.state = 'available' AND a.queue = $1 AND a.tenant_id = (SELECT t1.tenant_id FROM t1)
     ORDER BY a.priority, a.run_at, a.id
     LIMIT $2::integer
     FOR UPDATE SKIP LOCKED),
tok AS (SELECT gen_random_uuid() AS token),
claimed AS (
    UPDATE pgcrew.tasks t
       SET state = 'running', attempts = t.attempts + 1, claimed_by = $3,
           claim_token = (SELECT tok.token FROM tok), claimed_at = now(), heartbeat_at = now()
      FROM next
     WHERE t.id = next.id
    RETURNING t.id, t.queue, t.kind, t.tenant_id, t.run_id, t.priority, t.payload, t.attempts,
              t.max_attempts, t.claim_token, t.run_at, t.created_at,
              (extract(epoch FROM (now() - t.run_at)) * 1000000)::bigint AS lag_us)
SELECT true AS fast, c.id, c.queue, c.kind, c.tenant_id, c.run_id, c.priority, c.payload,
       c.attempts, c.max_attempts, c.claim_token, c.run_at, c.created_at, c.lag_us
  FROM claimed c
UNION ALL
SELECT false, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
 WHERE NOT (SELECT ok.fast FROM ok)
