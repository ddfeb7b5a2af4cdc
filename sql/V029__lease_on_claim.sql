-- pgcrew V029: a worker pool takes the run leases of the tasks it claims in the claim's own
-- transaction (issue #18, benchmark line "signalling 10,000 waiting runs completes them at
-- >= 1,000 runs/s" with fsync on).
--
-- Since V025 a resumed run's worker waited for two WAL flushes of its own: the commit of
-- pgcrew.lease_run (the lease, and the resume of a run whose wait resolved) and the commit of
-- pgcrew.finish_run. A pool that knows which task kinds drive runs (the agent runtime's
-- `pgcrew.agent_run`, or any kind registered for it) now calls pgcrew.lease_runs right after
-- its claim, in the same transaction: one flush for the whole claimed batch instead of one per
-- run.
--
-- The claim's transaction holds the claimed task rows; it must never wait for a run's lock
-- (a transaction holding that lock — pgcrew.signal_run waking the run's parked task, say — may
-- be waiting for one of those task rows). So pgcrew.lease_runs only TRIES each run's lock and
-- row: a run that is busy is skipped (no row comes back for it) and its handler takes the lease
-- itself with pgcrew.lease_run, as before. A run of another tenant than its task's is skipped
-- too: a task cannot lease a run it does not belong with.
--
-- pgcrew.lease_locked_run is pgcrew.lease_run's body after the lock (V025, unchanged): both
-- functions now share it.
-- ---------------------------------------------------------------------------------------------
-- Take the lease of run r, which the caller has locked (its advisory lock and row), and resume
-- it when it waits and its wait has resolved; the run row afterwards (see V025 for the rules).
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION pgcrew.lease_locked_run(r pgcrew.runs, p_owner text, p_ttl_us bigint,
                                        p_instance text)
RETURNS pgcrew.runs
LANGUAGE plpgsql AS $$
DECLARE
    v_wait pgcrew.run_waits;
    v_sig  record;
    v_type text;
    v_body jsonb;
    v_seq  bigint;
    v_hash bytea;
    v_out  pgcrew.runs;
BEGIN
    IF r.state NOT IN ('pending', 'running', 'waiting')
       OR (r.lease_owner <> p_owner AND coalesce(r.lease_expires_at > now(), false)) THEN
        RETURN r;
    END IF;
    IF r.state = 'waiting' THEN
        SELECT * INTO v_wait FROM pgcrew.run_waits w WHERE w.run_id = r.id;
        IF FOUND THEN
            SELECT s.id, s.payload INTO v_sig
              FROM pgcrew.run_signals s
             WHERE s.run_id = r.id AND s.name = v_wait.name AND s.consumed_at IS NULL
             ORDER BY s.id LIMIT 1;
            IF FOUND THEN
                v_type := 'signal_received';
                v_body := jsonb_build_object('name', v_wait.name, 'signal_id', v_sig.id,
                                             'payload', v_sig.payload);
                UPDATE pgcrew.run_signals
                   SET consumed_at = now(), consumed_by_step = v_wait.step_key
                 WHERE id = v_sig.id;
            ELSIF v_wait.deadline <= now() THEN
                v_type := 'wait_timed_out';
                v_body := jsonb_build_object('name', v_wait.name, 'deadline', v_wait.deadline);
            END IF;
        END IF;
    END IF;
    IF v_type IS NOT NULL THEN
        SELECT i.o_seq, i.o_hash INTO v_seq, v_hash
          FROM pgcrew.ledger_insert(r, v_type, v_wait.step_key, v_body) i;
        DELETE FROM pgcrew.run_waits WHERE run_id = r.id;
    END IF;
    PERFORM set_config('pgcrew.ledger_writer', 'append', true);
    UPDATE pgcrew.runs x
       SET lease_token = CASE
               WHEN x.lease_owner = p_owner AND x.lease_expires_at > now() THEN x.lease_token
               ELSE x.lease_token + 1 END,
           lease_owner = p_owner,
           lease_expires_at = now() + p_ttl_us * interval '1 microsecond',
           state = CASE WHEN v_type IS NULL THEN x.state ELSE 'running' END,
           instance_id = CASE WHEN v_type IS NULL THEN x.instance_id
                              ELSE coalesce(p_instance, x.instance_id) END,
           ledger_head_seq = coalesce(v_seq, x.ledger_head_seq),
           ledger_head_hash = coalesce(v_hash, x.ledger_head_hash),
           updated_at = now()
     WHERE x.id = r.id
    RETURNING x.* INTO v_out;
    PERFORM set_config('pgcrew.ledger_writer', '', true);
    RETURN v_out;
END $$;

CREATE OR REPLACE FUNCTION pgcrew.lease_run(p_run uuid, p_owner text, p_ttl_us bigint,
                                            p_instance text DEFAULT NULL)
RETURNS SETOF pgcrew.runs
LANGUAGE plpgsql AS $$
DECLARE
    r pgcrew.runs;
BEGIN
    IF p_owner IS NULL OR p_ttl_us IS NULL OR p_ttl_us < 1000 THEN
        RAISE EXCEPTION 'a run lease needs an owner and a ttl of at least 1 ms' USING ERRCODE = '22023';
    END IF;
    SELECT * INTO r FROM pgcrew.locked_run(p_run);
    IF r.id IS NULL THEN
        RETURN;
    END IF;
    RETURN NEXT pgcrew.lease_locked_run(r, p_owner, p_ttl_us, p_instance);
END $$;

-- ---------------------------------------------------------------------------------------------
-- Try to take the leases of the runs p_runs (each with its task's tenant, p_tenants, same
-- length) for p_owner, without ever waiting: a run whose lock or row another transaction holds,
-- an unknown run and a run of another tenant are skipped. The rows of the runs it did lock,
-- afterwards (the lease is the caller's when lease_owner = p_owner and the run is not finished).
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION pgcrew.lease_runs(p_runs uuid[], p_tenants text[], p_owner text,
                                  p_ttl_us bigint, p_instance text DEFAULT NULL)
RETURNS SETOF pgcrew.runs
LANGUAGE plpgsql AS $$
DECLARE
    r      pgcrew.runs;
    v_id   uuid;
    v_ten  text;
    v_key  bigint;
BEGIN
    IF p_owner IS NULL OR p_ttl_us IS NULL OR p_ttl_us < 1000 THEN
        RAISE EXCEPTION 'a run lease needs an owner and a ttl of at least 1 ms' USING ERRCODE = '22023';
    END IF;
    IF cardinality(p_runs) IS DISTINCT FROM cardinality(p_tenants) THEN
        RAISE EXCEPTION 'pgcrew.lease_runs takes one tenant per run (% runs, % tenants)',
            cardinality(p_runs), cardinality(p_tenants) USING ERRCODE = '22023';
    END IF;
    FOR v_id, v_ten IN
        SELECT DISTINCT ON (u.id) u.id, u.tenant
          FROM unnest(p_runs, p_tenants) AS u(id, tenant)
         WHERE u.id IS NOT NULL
         ORDER BY u.id
    LOOP
        SELECT k.lock_key INTO v_key FROM pgcrew.runs k WHERE k.id = v_id;
        CONTINUE WHEN v_key IS NULL OR NOT pg_try_advisory_xact_lock(v_key);
        SELECT * INTO r FROM pgcrew.runs x WHERE x.id = v_id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN r.id IS NULL OR r.tenant_id IS DISTINCT FROM v_ten;
        RETURN NEXT pgcrew.lease_locked_run(r, p_owner, p_ttl_us, p_instance);
    END LOOP;
END $$;
