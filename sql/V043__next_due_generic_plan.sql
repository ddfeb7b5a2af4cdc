-- pgcrew V043: the idle worker pool's "when is the next task due" read
-- (sql/queries/queue/next_due.sql) with one plan per connection instead of one per call.
--
-- An idle pool runs that read each time it finds no work (after every wake-up). As a prepared
-- statement its plan cost compared badly with the custom plans (the array of queues is unknown
-- to a generic plan), so PostgreSQL planned it again on every call: 0.6-2 ms of planning for
-- 0.04 ms of execution (EXPLAIN ANALYZE on PostgreSQL 15, 2026-11-29), on the wake-up path of
-- every instance. The generic plan is as good (0.03-0.04 ms). A PL/pgSQL function keeps its
-- statements' plans for the session, and its SET clause makes that plan the generic one.
CREATE FUNCTION pgcrew.next_due_in(p_queues text[]) RETURNS bigint
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN (
        SELECT greatest(0, (extract(epoch FROM (min(d.at) - now())) * 1000000)::bigint) AS due_in_us
          FROM (SELECT s.run_at AS at
                  FROM unnest(p_queues) AS q(queue),
                       LATERAL (SELECT s.run_at FROM pgcrew.tasks s
                                 WHERE s.state IN ('scheduled', 'retryable') AND s.pending_deps = 0
                                   AND s.queue = q.queue
                                 ORDER BY s.run_at
                                 LIMIT 1) s
                UNION ALL
                SELECT now() + make_interval(secs => (1 - pgcrew.rate_tokens(l)) / l.per_second)
                  FROM pgcrew.rate_limits l
                 WHERE EXISTS (SELECT FROM pgcrew.claim_features f
                                WHERE f.queue = ANY (p_queues) OR f.queue = '')
                   AND (l.scope <> 'queue' OR l.name = ANY (p_queues))
                   AND pgcrew.rate_tokens(l) < 1
                   AND EXISTS (SELECT FROM pgcrew.tasks a
                                WHERE a.state = 'available' AND a.queue = ANY (p_queues))) d
        HAVING min(d.at) IS NOT NULL
    );
END $$;

-- Functions: nothing for PUBLIC (as V010; every migration creating functions revokes again).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgcrew FROM PUBLIC;
