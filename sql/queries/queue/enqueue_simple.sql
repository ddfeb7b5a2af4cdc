-- Enqueue one task without dependencies or unique key: a plain INSERT (the tenant is locked
-- FOR KEY SHARE; an unknown tenant yields NULL and fails on NOT NULL). When the task is available
-- at once and pools wait on its queue, the same statement wakes them (inline, because calling a
-- function nearly doubles this statement's cost on an idle backend, V007), by name: one of the
-- queue's waiting pools, taken in turn by task id, claims at once, and the next one is its
-- backup, which claims after a short delay (in case the first was killed before it was reaped,
-- or filled up meanwhile). The NOTIFY goes to the named pools' instances only, on each one's
-- wake channel (`'pgcrew_wake_'` and 32 hex digits of the SHA-256 of the instance id, as
-- `coord::notify::wake_channel` computes it), so an enqueue into N idle instances wakes one
-- process and costs one claim, not N; the payload is `{queue, pool, backup}`. The CASE and the
-- state filter keep the waiter read and the NOTIFY from running otherwise.
WITH tn AS (
    SELECT tn.id FROM pgcrew.tenants tn WHERE tn.id = $3 FOR KEY SHARE),
v AS (
    SELECT coalesce($8::timestamptz, now() + $7::int8 * interval '1 microsecond') AS run_at),
ins AS (
    INSERT INTO pgcrew.tasks AS t (queue, kind, tenant_id, run_id, priority, state, payload,
                                   max_attempts, run_at)
    SELECT $1, $2, (SELECT tn.id FROM tn), $4, $5,
           CASE WHEN v.run_at > now() THEN 'scheduled' ELSE 'available' END,
           $6, $9, v.run_at
      FROM v
    RETURNING t.id, t.state, t.queue),
w AS (
    SELECT array_agg(w.pool_id ORDER BY w.pool_id) AS pools,
           array_agg(w.instance_id ORDER BY w.pool_id) AS instances,
           count(*) AS n
      FROM pgcrew.queue_waiters w
     WHERE w.queue = (SELECT ins.queue FROM ins WHERE ins.state = 'available')),
named AS (
    SELECT ins.queue, w.pools, w.instances,
           1 + (ins.id % w.n)::int AS p,
           CASE WHEN w.n > 1 THEN 1 + ((ins.id + 1) % w.n)::int END AS b
      FROM ins, w
     WHERE w.n > 0),
woke AS (
    SELECT count(*) AS n
      FROM named, unnest(ARRAY[named.p, named.b]) AS k(i)
     WHERE k.i IS NOT NULL
       AND EXISTS (SELECT FROM pg_notify(
               'pgcrew_wake_' || left(encode(sha256(convert_to(named.instances[k.i], 'UTF8')),
                                             'hex'), 32),
               json_build_object('queue', named.queue,
                                 'pool', named.pools[named.p],
                                 'backup', named.pools[named.b])::text)))
SELECT ins.id, ins.state, false AS duplicate, (SELECT woke.n > 0 FROM woke) AS notified
  FROM ins
