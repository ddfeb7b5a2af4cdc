-- pgcrew V049: a single enqueue sent as an unnamed statement is no longer planned on every call
-- (issue #23).
--
-- sql/queries/queue/enqueue_simple.sql (an enqueue without dependencies or unique key) is one
-- statement of six CTEs. On a pooled connection it is prepared once and its plan kept. Where
-- statements go out unnamed — behind PgBouncer in transaction mode (StatementMode::Unnamed),
-- and on a caller's plain tokio-postgres client or transaction (a transactional enqueue on the
-- application's own connection) — PostgreSQL parses, analyses and plans it on every call:
-- pgbench, one client, unnamed statements (`-M extended`): 0.54-0.55 ms a call, against
-- 0.17 ms prepared. As the body of a PL/pgSQL function its plan stays in the server session
-- (whichever client a pooler lends it to), and only the one-line call is planned each time:
-- 0.23 ms unnamed. Prepared, the call costs 0.012-0.018 ms more than the statement, so pooled
-- connections that cache statements keep sending the statement itself; the others call this
-- function (queue/enqueue_simple_call.sql). The body is the file's statement, its parameters
-- now the arguments; queue::plans::the_enqueue_function_runs_the_files_statement checks
-- that the two stay the same. Its plan does not depend on the values (the tenant by key, the
-- queue's waiters by key), so it is the generic one from the first call, as V048's claims.

-- $1 queue, $2 kind, $3 tenant, $4 run, $5 priority, $6 payload, $7 delay (µs), $8 run at,
-- $9 max attempts; one row as queue/enqueue_simple.sql returns.
CREATE FUNCTION pgcrew.enqueue_simple(p_queue text, p_kind text, p_tenant text, p_run uuid,
                                      p_priority smallint, p_payload jsonb, p_delay_us bigint,
                                      p_run_at timestamptz, p_max_attempts integer)
RETURNS TABLE (id bigint, state text, duplicate boolean, notified boolean)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH tn AS (
        SELECT tn.id FROM pgcrew.tenants tn WHERE tn.id = p_tenant FOR KEY SHARE),
    v AS (
        SELECT coalesce(p_run_at::timestamptz, now() + p_delay_us::int8 * interval '1 microsecond') AS run_at),
    ins AS (
        INSERT INTO pgcrew.tasks AS t (queue, kind, tenant_id, run_id, priority, state, payload,
                                       max_attempts, run_at)
        SELECT p_queue, p_kind, (SELECT tn.id FROM tn), p_run, p_priority,
               CASE WHEN v.run_at > now() THEN 'scheduled' ELSE 'available' END,
               p_payload, p_max_attempts, v.run_at
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
      FROM ins;
END $$;

REVOKE ALL ON FUNCTION pgcrew.enqueue_simple(text, text, text, uuid, smallint, jsonb, bigint,
                                             timestamptz, integer) FROM PUBLIC;
