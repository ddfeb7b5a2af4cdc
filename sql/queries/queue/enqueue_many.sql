-- Bulk enqueue. The named tenants are locked FOR KEY SHARE once (not per row); a task naming an
-- unknown tenant gets a NULL tenant_id and the whole statement fails on NOT NULL. Queues that
-- got available tasks and have a waiting pool are notified once each: the test of
-- `pgcrew.wake_queues`, inline (a call to it costs more than a small enqueue; see V007).
WITH n AS (
    SELECT *
      FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::int2[], $6::jsonb[],
                  $7::int4[], $8::timestamptz[], $9::int8[], $10::text[])
           WITH ORDINALITY
           AS n(queue, kind, tenant_id, run_id, priority, payload, max_attempts, run_at,
                delay_us, unique_key, ord)),
tn AS (
    SELECT tn.id FROM pgcrew.tenants tn
     WHERE tn.id IN (SELECT DISTINCT n.tenant_id FROM n)
       FOR KEY SHARE),
ins AS (
    INSERT INTO pgcrew.tasks AS t (queue, kind, tenant_id, run_id, priority, state, payload,
                                   max_attempts, run_at, unique_key)
    SELECT n.queue, n.kind, tn.id, n.run_id, n.priority,
           CASE WHEN coalesce(n.run_at, now() + n.delay_us * interval '1 microsecond') > now()
                THEN 'scheduled' ELSE 'available' END,
           n.payload, n.max_attempts,
           coalesce(n.run_at, now() + n.delay_us * interval '1 microsecond'),
           n.unique_key
      FROM n LEFT JOIN tn ON tn.id = n.tenant_id
     ORDER BY n.ord
    ON CONFLICT (tenant_id, queue, unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'running', 'retryable')
        DO NOTHING
    RETURNING t.id, t.state, t.queue),
woke AS (
    SELECT count(*) AS n
      FROM (SELECT DISTINCT ins.queue FROM ins WHERE ins.state = 'available') q
     WHERE CASE WHEN EXISTS (SELECT FROM pgcrew.queue_waiters w WHERE w.queue = q.queue)
                THEN EXISTS (SELECT FROM pg_notify('pgcrew_task_available',
                                                   json_build_object('queue', q.queue)::text))
                ELSE false END)
-- Input order: the CTE keeps the insertion order; `woke` is one row, evaluated once.
SELECT ins.id FROM ins WHERE (SELECT woke.n FROM woke) IS NOT NULL
