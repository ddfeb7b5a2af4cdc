-- pgcrew V051: an acknowledgement of a few tasks no longer plans its update on every call
-- (issue #23).
--
-- pgcrew.ack_tasks updates the batch's tasks in one statement over unnest() of its arrays.
-- PostgreSQL's plan cache planned that statement for the arrays it was given and compared the
-- cost with the generic plan's: for a batch of one or two tasks (an idle worker pool, every
-- agent run) a plan for the values, which knows the batch's length, always looked cheaper, so
-- the statement was planned again on every call. pg_stat_statements with nested statements,
-- `pgcrew bench agents --runs 2000 --instances 1`: 1,872 plans in 1,871 acknowledgements, 0.35 ms
-- of planning each against 0.18 ms of execution. (Batches of 30-60 tasks, as under load, kept
-- the generic plan, which is why V047's test did not see it.) Redefined with the arrays read
-- through a one-row `arg`: no plan knows the batch's length, every plan costs the same, and
-- the generic one is kept from the sixth call. The update still finds the tasks by primary key
-- in the batch's id order (V042). The check of a key-limited queue (V047: "planned again on every
-- call, but only where key limits are used"; 1,108 plans in 1,107 acknowledgements of `bench
-- queue --with-limits`, 0.087 ms each against 0.067 ms of execution) reads the batch's queues
-- and size the same way. The rest of the function is V047's, unchanged.
-- Test: queue::plans::acknowledgements_plan_nothing_once_warm (batches of 50 and of 1, and of 1
-- in a queue with a key limit).

CREATE OR REPLACE FUNCTION pgcrew.ack_tasks(p_ids bigint[], p_tokens uuid[], p_outcomes text[],
                                            p_delays_us bigint[], p_errors text[])
RETURNS TABLE (id bigint, state text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_n integer := coalesce(cardinality(p_ids), 0);
    v_bad_id bigint;
    v_bad text;
    v_ids bigint[];
    v_states text[];
    v_queues text[];
    v_completed bigint[];
    v_failed bigint[];
BEGIN
    IF v_n = 0 THEN
        RETURN;
    END IF;
    IF coalesce(cardinality(p_tokens), 0) <> v_n OR coalesce(cardinality(p_outcomes), 0) <> v_n
       OR coalesce(cardinality(p_delays_us), v_n) <> v_n
       OR coalesce(cardinality(p_errors), v_n) <> v_n THEN
        RAISE EXCEPTION 'pgcrew.ack_tasks: % ids but % tokens, % outcomes, % delays and % errors',
            v_n, coalesce(cardinality(p_tokens), 0), coalesce(cardinality(p_outcomes), 0),
            coalesce(cardinality(p_delays_us)::text, 'NULL'), coalesce(cardinality(p_errors)::text, 'NULL')
            USING ERRCODE = 'PC020',
                  HINT = 'pass one id, claim token and outcome per acknowledgement, and either NULL or one delay (µs) and one error text (or NULL) each';
    END IF;
    SELECT a.id, a.outcome INTO v_bad_id, v_bad
      FROM unnest(p_ids, p_outcomes) AS a(id, outcome)
     WHERE a.outcome IS NULL OR a.outcome NOT IN ('complete', 'fail', 'snooze', 'discard')
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgcrew.ack_tasks: task %: unknown outcome %', v_bad_id, coalesce(quote_literal(v_bad), 'NULL')
            USING ERRCODE = 'PC020', HINT = 'outcomes are complete, fail, snooze or discard';
    END IF;
    -- V051: the batch's arrays through a one-row `arg`, so no plan sees their values (a plan
    -- for a batch of one or two looked cheaper than the generic plan, and the statement was
    -- planned again on every small acknowledgement).
    WITH arg AS MATERIALIZED (
        SELECT p_ids AS ids, p_tokens AS tokens, p_outcomes AS outcomes, p_delays_us AS delays,
               p_errors AS errors),
    a AS (
        SELECT a.id, a.token, a.outcome,
               -- 0 .. 3650 days (pgcrew.queue_limits()).
               least(greatest(coalesce(a.delay_us, 0), 0), 315360000000000) AS delay_us,
               CASE WHEN length(a.err) > 8192 THEN pgcrew.bound_task_error(a.err)
                    ELSE a.err END AS err
          FROM unnest((SELECT arg.ids FROM arg), (SELECT arg.tokens FROM arg),
                      (SELECT arg.outcomes FROM arg), (SELECT arg.delays FROM arg),
                      (SELECT arg.errors FROM arg))
               AS a(id, token, outcome, delay_us, err)
         -- V042: the nested loop locks the tasks in this order, the heartbeat's (an index scan
         -- of `id = ANY`) and rescue's: two of them never wait on each other crosswise (40P01).
         ORDER BY a.id),
    u AS (
        UPDATE pgcrew.tasks t
           SET state = CASE
                   WHEN a.outcome = 'complete' THEN 'completed'
                   WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled'
                   WHEN a.outcome = 'snooze' THEN 'scheduled'
                   WHEN a.outcome = 'discard' OR t.attempts >= t.max_attempts THEN 'discarded'
                   ELSE 'retryable' END,
               run_at = CASE WHEN a.outcome IN ('snooze', 'fail')
                             THEN now() + a.delay_us * interval '1 microsecond'
                             ELSE t.run_at END,
               attempts = CASE WHEN a.outcome = 'snooze' THEN greatest(0, t.attempts - 1)
                               ELSE t.attempts END,
               finalized_at = CASE
                   WHEN a.outcome = 'complete' OR t.cancel_requested_at IS NOT NULL
                        OR a.outcome = 'discard'
                        OR (a.outcome = 'fail' AND t.attempts >= t.max_attempts) THEN now() END,
               claim_token = NULL,
               heartbeat_at = NULL,
               last_error = coalesce(a.err, t.last_error),
               errors = CASE WHEN a.err IS NULL THEN t.errors
                             ELSE pgcrew.append_task_error(t.errors, t.attempts, a.err,
                                                           t.claimed_by) END
          FROM a
         -- `IS TRUE` (V042): the same test, but one tasks_running_idx's predicate does not
         -- match, so the rows are found by primary key (a nested loop over the batch).
         WHERE t.id = a.id AND t.claim_token = a.token AND (t.state = 'running') IS TRUE
        RETURNING t.id, t.state, t.has_dependants, t.queue)
    SELECT array_agg(u.id), array_agg(u.state), array_agg(DISTINCT u.queue),
           array_agg(u.id) FILTER (WHERE u.has_dependants AND u.state = 'completed'),
           array_agg(u.id) FILTER (WHERE u.has_dependants AND u.state IN ('discarded', 'cancelled'))
      INTO v_ids, v_states, v_queues, v_completed, v_failed
      FROM u;
    IF v_completed IS NOT NULL THEN
        PERFORM pgcrew.resolve_dependants(v_completed);
    END IF;
    IF v_failed IS NOT NULL THEN
        PERFORM pgcrew.cancel_dependants(v_failed, 'a dependency was discarded or cancelled');
    END IF;
    -- V035: a key at its bound freed: wake the pools of its queue. Only key-limited queues
    -- whose running tasks plus these acks reach the limit can have had a key at it.
    -- V047: first, without parameters (one plan for the session), whether any queue has a
    -- key limit at all; the check of this batch's queues, planned again on every call, runs
    -- only then.
    IF v_queues IS NOT NULL
       AND EXISTS (SELECT FROM pgcrew.claim_features f WHERE f.key_max IS NOT NULL) THEN
        -- V051: the batch's queues and size through a one-row `arg` too (this check was
        -- planned on every acknowledgement of a key-limited queue).
        IF EXISTS (WITH arg AS MATERIALIZED (SELECT v_queues AS queues, cardinality(v_ids) AS n)
                   SELECT FROM pgcrew.claim_features f
                    WHERE f.queue = ANY ((SELECT arg.queues FROM arg)::text[])
                      AND f.key_max IS NOT NULL
                      AND (SELECT count(*) FROM pgcrew.tasks r
                            WHERE r.state = 'running' AND r.queue = f.queue)
                          + (SELECT arg.n FROM arg) >= f.key_max) THEN
            -- V046: the batch's tasks and the running tasks of its queues counted per key in one
            -- aggregate (not one scan of the running tasks per key of the batch).
            PERFORM pg_notify('pgcrew_task_available', json_build_object('queue', w.queue)::text)
              FROM (SELECT DISTINCT c.queue
                      FROM (SELECT x.queue, x.payload ->> k.key_field AS key, k.max_running,
                                   true AS acked
                              FROM pgcrew.tasks x JOIN pgcrew.queue_key_limits k ON k.queue = x.queue
                             WHERE x.id = ANY (v_ids)
                            UNION ALL
                            SELECT r.queue, r.payload ->> k.key_field, k.max_running, false
                              FROM pgcrew.tasks r JOIN pgcrew.queue_key_limits k ON k.queue = r.queue
                             WHERE r.state = 'running' AND r.queue = ANY (v_queues)) c
                     WHERE c.key IS NOT NULL
                     GROUP BY c.queue, c.key, c.max_running
                    -- A key of the batch whose running tasks, these acknowledged ones included, were
                    -- at the limit.
                    HAVING bool_or(c.acked) AND count(*) >= c.max_running) w;
        END IF;
    END IF;
    IF v_ids IS NOT NULL THEN
        RETURN QUERY SELECT x.id, x.state FROM unnest(v_ids, v_states) AS x(id, state);
    END IF;
END $$;
