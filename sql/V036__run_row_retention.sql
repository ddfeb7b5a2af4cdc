-- =============================================================================================
-- Retention of run rows (issue #22, "soak table growth"), run by the leader's maintenance when
-- ClientConfig::run_row_retention is set (off by default).
--
-- Run retention (V013, pgcrew.retain_finished_runs) removes a finished run's events, artifacts,
-- summaries and cost entries but keeps its row and chain anchor, so its ledger still verifies;
-- those stay forever (about 0.6 kB per run). This second, longer retention deletes what is left
-- of a run that run retention already handled, once it finished long enough ago: its row, its
-- chain anchor, its checkpoints, its waits and signals (cascade), and unlinks the budget
-- reservations and cost entries still naming it (ON DELETE SET NULL; their totals are kept).
--
-- A run row is deleted only when all of these hold:
--   - it is finished (completed, failed, cancelled) and retained (runs.retained_at set), and
--     finalized more than the age ago;
--   - no event of it is left (retention keeps the events of a ledger that does not end at its
--     recorded head: that run stays, for an operator to look at);
--   - no run names it as its parent (children go first; a parent waits for them);
--   - its own parent, if any, is finished (a running or waiting parent may still need it);
--   - its tenant is not being moved between shards (pgcrew.tenant_transfers);
--   - nobody holds it (row lock or the run's advisory lock): skipped, taken next pass.
-- Each run is deleted in its own subtransaction: a run that became referenced meanwhile (a new
-- fork or child committed after the check) is skipped, not an error for the whole batch.
-- =============================================================================================

-- What the deletes look up by run: children of a run (the self-referencing foreign key), the
-- reservations and signals of a run (ON DELETE SET NULL / CASCADE), and the retained runs by age.
CREATE INDEX runs_parent_idx ON pgcrew.runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runs_row_retention_idx ON pgcrew.runs (finalized_at) WHERE retained_at IS NOT NULL;
CREATE INDEX budget_reservations_run_idx ON pgcrew.budget_reservations (run_id)
    WHERE run_id IS NOT NULL;
CREATE INDEX run_signals_run_idx ON pgcrew.run_signals (run_id);

-- Delete at most p_batch retained run rows finalized more than p_older_than_us microseconds ago
-- (oldest first). Returns one row per deleted run: its id, tenant, and the checkpoints and chain
-- anchors deleted with it. 22023 for a negative age or a batch below 1.
CREATE FUNCTION pgcrew.delete_retained_runs(p_older_than_us bigint, p_batch integer)
RETURNS TABLE (o_run uuid, o_tenant text, o_checkpoints bigint, o_anchors bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_run record;
BEGIN
    IF p_older_than_us IS NULL OR p_older_than_us < 0 OR p_batch IS NULL OR p_batch < 1 THEN
        RAISE EXCEPTION 'run row retention needs an age >= 0 and a batch >= 1' USING ERRCODE = '22023';
    END IF;
    FOR v_run IN
        SELECT r.id, r.tenant_id
          FROM pgcrew.runs r
         WHERE r.retained_at IS NOT NULL
           AND r.state IN ('completed', 'failed', 'cancelled')
           AND r.finalized_at < now() - p_older_than_us * interval '1 microsecond'
           AND NOT EXISTS (SELECT 1 FROM pgcrew.events e WHERE e.run_id = r.id)
           AND NOT EXISTS (SELECT 1 FROM pgcrew.runs c WHERE c.parent_run_id = r.id)
           AND NOT EXISTS (SELECT 1 FROM pgcrew.runs p
                            WHERE p.id = r.parent_run_id
                              AND p.state NOT IN ('completed', 'failed', 'cancelled'))
           AND NOT EXISTS (SELECT 1 FROM pgcrew.tenant_transfers t WHERE t.tenant_id = r.tenant_id)
         ORDER BY r.finalized_at
         LIMIT p_batch
         FOR UPDATE SKIP LOCKED
    LOOP
        IF NOT pg_try_advisory_xact_lock(pgcrew.lock_key('run', v_run.id::text)) THEN
            CONTINUE;
        END IF;
        BEGIN
            DELETE FROM pgcrew.ledger_checkpoints c WHERE c.run_id = v_run.id;
            GET DIAGNOSTICS o_checkpoints = ROW_COUNT;
            PERFORM set_config('pgcrew.ledger_writer', 'purge', true);
            DELETE FROM pgcrew.chain_anchors a
             WHERE a.run_id = v_run.id AND a.tenant_id = v_run.tenant_id;
            GET DIAGNOSTICS o_anchors = ROW_COUNT;
            PERFORM set_config('pgcrew.ledger_writer', '', true);
            -- Retention left none; a finished run gets none: only for completeness.
            DELETE FROM pgcrew.artifacts a WHERE a.run_id = v_run.id;
            DELETE FROM pgcrew.summaries s WHERE s.run_id = v_run.id;
            DELETE FROM pgcrew.runs r WHERE r.id = v_run.id AND r.tenant_id = v_run.tenant_id;
        EXCEPTION WHEN foreign_key_violation THEN
            -- Referenced since the check (a fork or child committed meanwhile): keep it.
            PERFORM set_config('pgcrew.ledger_writer', '', true);
            CONTINUE;
        END;
        o_run := v_run.id;
        o_tenant := v_run.tenant_id;
        RETURN NEXT;
    END LOOP;
END $$;

-- Functions: nothing for PUBLIC (as V010; every migration creating functions revokes again).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgcrew FROM PUBLIC;
