-- pgcrew installation secret: advisory-lock keys that no tenant role can compute.
--
-- Before this migration every advisory-lock key was derived from public values (the run id, the
-- tenant id, a constant), so any role that could connect could take the lock first and hold a
-- tenant's run, task limit or every migrator hostage. Keys are now derived with a random
-- secret held in an owner-only table:
--     key = first 8 bytes of sha256(secret || utf8(scope) || 0x00 || utf8(id)), as a bigint
-- Roles other than the owner can neither read the secret nor call the derivation.

CREATE TABLE pgcrew.installation_secret (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- 32 bytes from the server's strong random source (gen_random_uuid uses pg_strong_random).
    secret     bytea NOT NULL DEFAULT (uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid())),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pgcrew.installation_secret DEFAULT VALUES;
REVOKE ALL ON pgcrew.installation_secret FROM PUBLIC;

-- The advisory-lock key of (scope, id): `run` (ledger, leases, transitions of one run),
-- `tenant_runs` (run admission of one tenant), `tenant_tasks` (task-limit claims of one tenant),
-- `migrate` (the migrators).
-- PL/pgSQL rather than SQL: a SQL function that reads a table cannot be inlined, and is then
-- planned again in every transaction (about 40 µs); PL/pgSQL keeps its plan per session.
CREATE FUNCTION pgcrew.lock_key(p_scope text, p_id text) RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    v_secret bytea;
BEGIN
    SELECT s.secret INTO STRICT v_secret FROM pgcrew.installation_secret s;
    RETURN ('x' || encode(substr(sha256(v_secret || convert_to(p_scope, 'UTF8') || '\x00'::bytea
                                        || convert_to(p_id, 'UTF8')), 1, 8), 'hex'))::bit(64)::bigint;
END $$;
REVOKE ALL ON FUNCTION pgcrew.lock_key(text, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgcrew.lock_run(run uuid) RETURNS void LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(pgcrew.lock_key('run', run::text))
$$;
REVOKE ALL ON FUNCTION pgcrew.lock_run(uuid) FROM PUBLIC;

-- Run leases, as in V002, under the secret-keyed run lock.
CREATE OR REPLACE FUNCTION pgcrew.acquire_run_lease(p_run uuid, p_owner text, p_ttl_us bigint)
RETURNS TABLE (o_token bigint, o_expires_at timestamptz, o_state text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(pgcrew.lock_key('run', p_run::text));
    RETURN QUERY
    UPDATE pgcrew.runs r
       SET lease_token = CASE
               WHEN r.lease_owner = p_owner AND r.lease_expires_at > now() THEN r.lease_token
               ELSE r.lease_token + 1 END,
           lease_owner = p_owner,
           lease_expires_at = now() + p_ttl_us * interval '1 microsecond',
           updated_at = now()
     WHERE r.id = p_run
       AND r.state IN ('pending', 'running')
       AND (r.lease_owner IS NULL OR r.lease_expires_at IS NULL OR r.lease_expires_at <= now()
            OR r.lease_owner = p_owner)
    RETURNING r.lease_token, r.lease_expires_at, r.state;
END $$;

CREATE OR REPLACE FUNCTION pgcrew.renew_run_lease(p_run uuid, p_owner text, p_token bigint,
                                                  p_ttl_us bigint)
RETURNS TABLE (o_expires_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(pgcrew.lock_key('run', p_run::text));
    RETURN QUERY
    UPDATE pgcrew.runs r
       SET lease_expires_at = now() + p_ttl_us * interval '1 microsecond',
           updated_at = now()
     WHERE r.id = p_run AND r.lease_owner = p_owner AND r.lease_token = p_token
       AND r.lease_expires_at > now()
    RETURNING r.lease_expires_at;
END $$;

CREATE OR REPLACE FUNCTION pgcrew.release_run_lease(p_run uuid, p_owner text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(pgcrew.lock_key('run', p_run::text));
    UPDATE pgcrew.runs r
       SET lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
     WHERE r.id = p_run AND r.lease_owner = p_owner AND r.lease_token = p_token;
    RETURN FOUND;
END $$;

-- Claims, as in V003, with the tenant task-limit lock keyed by the secret (a tenant role that held
-- the old public key made claim_tasks skip that tenant for as long as it held it).
CREATE OR REPLACE FUNCTION pgcrew.claim_tasks(p_queues text[], p_limit integer, p_instance text)
RETURNS TABLE (id bigint, queue text, kind text, tenant_id text, run_id uuid, priority smallint,
               payload jsonb, attempts integer, max_attempts integer, claim_token uuid,
               run_at timestamptz, created_at timestamptz, lag_us bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_token uuid := gen_random_uuid();
    v_ids bigint[] := '{}';
    v_left integer := p_limit;
    v_q text;
    v_tenants text[];
    v_caps integer[];
    v_n integer;
    v_share integer;
    v_start integer;
    v_i integer;
    v_k integer;
    v_t text;
    v_lim integer;
    v_qlim integer;
    v_running integer;
    v_take integer;
    v_got bigint[];
    v_pass integer;
BEGIN
    IF p_limit IS NULL OR p_limit <= 0 THEN
        RETURN;
    END IF;
    FOREACH v_q IN ARRAY p_queues LOOP
        EXIT WHEN v_left <= 0;
        -- Promote this queue's due scheduled / retryable tasks (bounded per claim).
        UPDATE pgcrew.tasks t SET state = 'available'
         WHERE t.id IN (SELECT s.id FROM pgcrew.tasks s
                         WHERE s.state IN ('scheduled', 'retryable') AND s.pending_deps = 0
                           AND s.queue = v_q AND s.run_at <= now()
                         ORDER BY s.run_at LIMIT 1000
                         FOR UPDATE SKIP LOCKED);
        -- Tenants with available work in this queue (loose index scan).
        WITH RECURSIVE act(tid) AS (
            (SELECT a.tenant_id FROM pgcrew.tasks a
              WHERE a.state = 'available' AND a.queue = v_q
              ORDER BY a.tenant_id LIMIT 1)
            UNION ALL
            SELECT (SELECT a.tenant_id FROM pgcrew.tasks a
                     WHERE a.state = 'available' AND a.queue = v_q AND a.tenant_id > act.tid
                     ORDER BY a.tenant_id LIMIT 1)
              FROM act WHERE act.tid IS NOT NULL)
        SELECT array_agg(act.tid) INTO v_tenants FROM act WHERE act.tid IS NOT NULL;
        CONTINUE WHEN v_tenants IS NULL;
        v_n := cardinality(v_tenants);
        -- Each tenant's room this cycle: its limits minus what is running (NULL = unlimited).
        v_caps := array_fill(NULL::integer, ARRAY[v_n]);
        FOR v_i IN 1..v_n LOOP
            v_t := v_tenants[v_i];
            SELECT tn.max_concurrent_tasks INTO v_lim FROM pgcrew.tenants tn WHERE tn.id = v_t;
            SELECT l.max_concurrent_tasks INTO v_qlim FROM pgcrew.tenant_queue_limits l
             WHERE l.tenant_id = v_t AND l.queue = v_q;
            IF v_lim IS NOT NULL OR v_qlim IS NOT NULL THEN
                IF NOT pg_try_advisory_xact_lock(pgcrew.lock_key('tenant_tasks', v_t)) THEN
                    v_caps[v_i] := 0;
                    CONTINUE;
                END IF;
                v_caps[v_i] := 2147483647;
                IF v_lim IS NOT NULL THEN
                    SELECT count(*) INTO v_running FROM pgcrew.tasks r
                     WHERE r.state = 'running' AND r.tenant_id = v_t;
                    v_caps[v_i] := least(v_caps[v_i], greatest(0, v_lim - v_running));
                END IF;
                IF v_qlim IS NOT NULL THEN
                    SELECT count(*) INTO v_running FROM pgcrew.tasks r
                     WHERE r.state = 'running' AND r.tenant_id = v_t AND r.queue = v_q;
                    v_caps[v_i] := least(v_caps[v_i], greatest(0, v_qlim - v_running));
                END IF;
            END IF;
        END LOOP;
        -- Fast path: one unlimited tenant and nothing collected yet: claim in one statement.
        IF v_n = 1 AND v_caps[1] IS NULL AND cardinality(v_ids) = 0 THEN
            v_t := v_tenants[1];
            RETURN QUERY
            WITH next AS (
                SELECT a.id FROM pgcrew.tasks a
                 WHERE a.state = 'available' AND a.queue = v_q AND a.tenant_id = v_t
                 ORDER BY a.priority, a.run_at, a.id
                 LIMIT v_left
                 FOR UPDATE SKIP LOCKED)
            UPDATE pgcrew.tasks t
               SET state = 'running', attempts = t.attempts + 1, claimed_by = p_instance,
                   claim_token = v_token, claimed_at = now(), heartbeat_at = now()
              FROM next
             WHERE t.id = next.id
            RETURNING t.id, t.queue, t.kind, t.tenant_id, t.run_id, t.priority, t.payload,
                      t.attempts, t.max_attempts, t.claim_token, t.run_at, t.created_at,
                      (extract(epoch FROM (now() - t.run_at)) * 1000000)::bigint;
            RETURN;
        END IF;
        -- Pass 1: an equal share each (when tenants outnumber the batch, successive claims start
        -- at successive tenants: round robin); pass 2: leftover capacity to tenants with work.
        v_start := CASE WHEN v_n > v_left
                        THEN (nextval('pgcrew.task_claim_rotation') % v_n)::integer ELSE 0 END;
        FOR v_pass IN 1..2 LOOP
            EXIT WHEN v_left <= 0;
            v_share := CASE WHEN v_pass = 1 THEN greatest(1, ceil(v_left::numeric / v_n)::integer)
                            ELSE v_left END;
            FOR v_k IN 0..v_n - 1 LOOP
                EXIT WHEN v_left <= 0;
                v_i := ((v_start + v_k) % v_n) + 1;
                v_take := least(v_share, v_left, coalesce(v_caps[v_i], 2147483647));
                CONTINUE WHEN v_take <= 0;
                v_t := v_tenants[v_i];
                v_got := ARRAY(SELECT a.id FROM pgcrew.tasks a
                                WHERE a.state = 'available' AND a.queue = v_q AND a.tenant_id = v_t
                                  AND NOT (a.id = ANY (v_ids))
                                ORDER BY a.priority, a.run_at, a.id
                                LIMIT v_take
                                FOR UPDATE SKIP LOCKED);
                v_ids := v_ids || v_got;
                v_left := v_left - cardinality(v_got);
                IF v_caps[v_i] IS NOT NULL THEN
                    v_caps[v_i] := v_caps[v_i] - cardinality(v_got);
                END IF;
                IF cardinality(v_got) < v_take THEN
                    v_caps[v_i] := 0; -- drained (or all locked): skip in pass 2
                END IF;
            END LOOP;
        END LOOP;
    END LOOP;

    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE pgcrew.tasks t
       SET state = 'running', attempts = t.attempts + 1, claimed_by = p_instance,
           claim_token = v_token, claimed_at = now(), heartbeat_at = now()
     WHERE t.id = ANY (v_ids)
    RETURNING t.id, t.queue, t.kind, t.tenant_id, t.run_id, t.priority, t.payload, t.attempts,
              t.max_attempts, t.claim_token, t.run_at, t.created_at,
              (extract(epoch FROM (now() - t.run_at)) * 1000000)::bigint;
END $$;

-- Ledger appends, as in V002, under the secret-keyed run lock.
CREATE OR REPLACE FUNCTION pgcrew.append_events(p_run uuid, p_lease_token bigint, p_types text[],
                                     p_step_keys text[], p_payloads jsonb[], p_dedupe boolean[])
RETURNS TABLE (o_seq bigint, o_hash bytea, o_created_at timestamptz, o_inserted boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_tenant  text;
    v_token   bigint;
    v_owner   text;
    v_expires timestamptz;
    v_seq     bigint;
    v_hash    bytea;
    v_prev    bytea;
    v_now     timestamptz;
    v_first   bigint;
    v_done    text;
    i         integer;
BEGIN
    PERFORM pg_advisory_xact_lock(pgcrew.lock_key('run', p_run::text));
    SELECT r.tenant_id, r.lease_token, r.lease_owner, r.lease_expires_at,
           r.ledger_head_seq, r.ledger_head_hash
      INTO v_tenant, v_token, v_owner, v_expires, v_seq, v_hash
      FROM pgcrew.runs r WHERE r.id = p_run;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'PC002';
    END IF;
    IF p_lease_token IS NOT NULL
       AND (v_token <> p_lease_token OR v_owner IS NULL OR v_expires IS NULL OR v_expires <= now()) THEN
        RAISE EXCEPTION 'the lease on run % with token % is no longer held (current token %)',
            p_run, p_lease_token, v_token USING ERRCODE = 'PC001';
    END IF;
    -- The run row carries the ledger head (last seq and hash), so truncating the ledger is
    -- detectable and appends need no lookup of the last event.
    IF v_hash IS NULL THEN
        v_seq := 0;
        v_hash := decode(repeat('00', 32), 'hex');
    END IF;
    v_now := clock_timestamp();
    FOR i IN 1 .. coalesce(array_length(p_types, 1), 0) LOOP
        IF p_dedupe[i] THEN
            SELECT e.seq, e.hash, e.created_at INTO o_seq, o_hash, o_created_at
              FROM pgcrew.events e
             WHERE e.run_id = p_run AND e.dedupe AND e.event_type = p_types[i]
               AND coalesce(e.step_key, '') = coalesce(p_step_keys[i], '');
            IF FOUND THEN
                o_inserted := false;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        v_prev := v_hash;
        v_seq := v_seq + 1;
        v_hash := pgcrew.event_hash(v_prev, v_seq, v_tenant, p_types[i], p_step_keys[i], v_now,
                                    p_payloads[i]);
        INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, step_key, payload,
                                   prev_hash, hash, created_at, dedupe)
        VALUES (p_run, v_seq, v_tenant, p_types[i], p_step_keys[i], p_payloads[i],
                v_prev, v_hash, v_now, coalesce(p_dedupe[i], false));
        IF v_first IS NULL THEN
            v_first := v_seq;
        END IF;
        o_seq := v_seq;
        o_hash := v_hash;
        o_created_at := v_now;
        o_inserted := true;
        RETURN NEXT;
    END LOOP;
    IF v_first IS NOT NULL THEN
        UPDATE pgcrew.runs SET ledger_head_seq = v_seq, ledger_head_hash = v_hash WHERE id = p_run;
        v_done := coalesce(current_setting('pgcrew.notified_runs', true), '');
        IF position(p_run::text IN v_done) = 0 THEN
            PERFORM pg_notify('pgcrew_run_event',
                json_build_object('run_id', p_run, 'seq', v_first)::text);
            PERFORM set_config('pgcrew.notified_runs', v_done || p_run::text || ',', true);
        END IF;
    END IF;
END $$;
