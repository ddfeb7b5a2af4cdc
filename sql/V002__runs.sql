-- pgcrew runs: the hash-chained event ledger, artifacts, summaries, chain anchors, run leases.
--
-- Hash formula (public; auditors verify it from the table alone):
--   hash_n = sha256(hash_{n-1} || int8send(seq) || utf8(tenant_id) || 0x00 || utf8(event_type)
--                   || 0x00 || utf8(coalesce(step_key, '')) || 0x00
--                   || int8send(created_at in microseconds since the Unix epoch)
--                   || utf8(payload::text))
--   hash_0 = 32 zero bytes.

-- ---------------------------------------------------------------------------------------------
-- Events (append-only; pgcrew never updates or deletes a row except by explicit retention)
-- ---------------------------------------------------------------------------------------------
CREATE TABLE pgcrew.events (
    run_id     uuid NOT NULL,
    seq        bigint NOT NULL CHECK (seq > 0),
    tenant_id  text NOT NULL,
    event_type text NOT NULL,
    step_key   text,
    payload    jsonb NOT NULL,
    prev_hash  bytea NOT NULL,
    hash       bytea NOT NULL,
    created_at timestamptz NOT NULL,
    -- true when appended idempotently: at most one such row per (run, event_type, step_key).
    dedupe     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (run_id, seq)
);
CREATE UNIQUE INDEX events_dedupe_idx ON pgcrew.events (run_id, event_type, coalesce(step_key, ''))
    WHERE dedupe;
CREATE INDEX events_tenant_idx ON pgcrew.events (tenant_id, created_at);

-- The chain hash of one event (see the formula above). Declared STABLE like convert_to() so
-- that PostgreSQL inlines it (an IMMUTABLE declaration would prevent inlining: 3x slower).
CREATE FUNCTION pgcrew.event_hash(prev_hash bytea, seq bigint, tenant_id text, event_type text,
                                  step_key text, created_at timestamptz, payload jsonb)
RETURNS bytea LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sha256(prev_hash
                  || int8send(seq)
                  || convert_to(tenant_id, 'UTF8') || '\x00'::bytea
                  || convert_to(event_type, 'UTF8') || '\x00'::bytea
                  || convert_to(coalesce(step_key, ''), 'UTF8') || '\x00'::bytea
                  || int8send((extract(epoch FROM created_at) * 1000000)::int8)
                  || convert_to(payload::text, 'UTF8'))
$$;

-- The advisory lock key pair sequencing a run's ledger (and its leases and transitions).
CREATE FUNCTION pgcrew.lock_run(run uuid) RETURNS void LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(1885827701, hashtext(run::text))
$$;

-- Append events to a run in the caller's transaction. Arrays are parallel (one entry per event).
-- With p_lease_token set, the append is rejected (SQLSTATE PC001) unless that token is the
-- run's current, unexpired lease. Rows with p_dedupe[i] return the existing event with the same
-- (event_type, step_key) when there is one (o_inserted = false).
-- Notifies pgcrew_run_event {run_id, seq} at most once per transaction and run.
-- The ledger head: the last appended seq and hash, kept on the run row by append_events.
ALTER TABLE pgcrew.runs
    ADD COLUMN ledger_head_seq bigint NOT NULL DEFAULT 0,
    ADD COLUMN ledger_head_hash bytea;

CREATE FUNCTION pgcrew.append_events(p_run uuid, p_lease_token bigint, p_types text[],
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
    PERFORM pg_advisory_xact_lock(1885827701, hashtext(p_run::text));
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

-- ---------------------------------------------------------------------------------------------
-- Chain anchors: what remains of a run's ledger after retention removed its events.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE pgcrew.chain_anchors (
    run_id      uuid PRIMARY KEY,
    tenant_id   text NOT NULL,
    last_seq    bigint NOT NULL,
    last_hash   bytea NOT NULL,
    event_count bigint NOT NULL,
    reason      text NOT NULL,
    purged_at   timestamptz NOT NULL DEFAULT now()
);

-- Verify a run's chain. Returns one row: valid, the first bad seq (NULL when valid) and the
-- number of events checked. A missing row is reported at the missing seq; a changed row at its
-- own seq; swapped rows at the first of them.
CREATE FUNCTION pgcrew.verify_run_chain(run uuid)
RETURNS TABLE (valid boolean, first_bad_seq bigint, checked bigint)
LANGUAGE sql STABLE AS $$
    WITH ordered AS (
        SELECT e.seq,
               row_number() OVER (ORDER BY e.seq) AS rn,
               e.prev_hash,
               e.hash,
               coalesce(lag(e.hash) OVER (ORDER BY e.seq), decode(repeat('00', 32), 'hex')) AS expected_prev,
               pgcrew.event_hash(e.prev_hash, e.seq, e.tenant_id, e.event_type, e.step_key,
                                 e.created_at, e.payload) AS computed
          FROM pgcrew.events e
         WHERE e.run_id = run
    ),
    row_bad AS (
        SELECT CASE WHEN o.seq <> o.rn THEN o.rn ELSE o.seq END AS bad_seq
          FROM ordered o
         WHERE o.seq <> o.rn OR o.prev_hash <> o.expected_prev OR o.hash <> o.computed
         ORDER BY o.seq
         LIMIT 1
    ),
    -- Truncation: events missing after the last stored one, or a last event that is not the
    -- recorded head (runs whose events were purged keep a chain anchor instead).
    head_bad AS (
        SELECT CASE WHEN coalesce(l.seq, 0) < r.ledger_head_seq THEN coalesce(l.seq, 0) + 1
                    ELSE r.ledger_head_seq END AS bad_seq
          FROM pgcrew.runs r
          LEFT JOIN LATERAL (SELECT e.seq, e.hash FROM pgcrew.events e WHERE e.run_id = r.id
                              ORDER BY e.seq DESC LIMIT 1) l ON true
         WHERE r.id = run
           AND r.ledger_head_seq > 0
           AND NOT EXISTS (SELECT 1 FROM pgcrew.chain_anchors a WHERE a.run_id = r.id)
           AND (coalesce(l.seq, 0) < r.ledger_head_seq
                OR (l.seq = r.ledger_head_seq AND l.hash <> r.ledger_head_hash))
    ),
    bad AS (
        SELECT min(bad_seq) AS bad_seq FROM (SELECT bad_seq FROM row_bad
                                             UNION ALL SELECT bad_seq FROM head_bad) b
    )
    SELECT (SELECT bad_seq FROM bad) IS NULL,
           (SELECT bad_seq FROM bad),
           (SELECT count(*) FROM pgcrew.events e WHERE e.run_id = run)
$$;

-- ---------------------------------------------------------------------------------------------
-- Run leases (fenced). lease_token increments whenever a new holder takes the run.
-- ---------------------------------------------------------------------------------------------
-- Take (or re-take) the lease: succeeds when the run is not terminal and the lease is free,
-- expired, or already ours. Returns the token and expiry; no row when someone else holds it.
CREATE FUNCTION pgcrew.acquire_run_lease(p_run uuid, p_owner text, p_ttl_us bigint)
RETURNS TABLE (o_token bigint, o_expires_at timestamptz, o_state text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1885827701, hashtext(p_run::text));
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

-- Extend a lease that is still held (same owner and token, not expired).
CREATE FUNCTION pgcrew.renew_run_lease(p_run uuid, p_owner text, p_token bigint, p_ttl_us bigint)
RETURNS TABLE (o_expires_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1885827701, hashtext(p_run::text));
    RETURN QUERY
    UPDATE pgcrew.runs r
       SET lease_expires_at = now() + p_ttl_us * interval '1 microsecond',
           updated_at = now()
     WHERE r.id = p_run AND r.lease_owner = p_owner AND r.lease_token = p_token
       AND r.lease_expires_at > now()
    RETURNING r.lease_expires_at;
END $$;

-- Give a lease up (no-op unless owner and token match).
CREATE FUNCTION pgcrew.release_run_lease(p_run uuid, p_owner text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1885827701, hashtext(p_run::text));
    UPDATE pgcrew.runs r
       SET lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
     WHERE r.id = p_run AND r.lease_owner = p_owner AND r.lease_token = p_token;
    RETURN FOUND;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Artifacts (versioned key/value JSON per run) and summaries
-- ---------------------------------------------------------------------------------------------
CREATE TABLE pgcrew.artifacts (
    run_id     uuid NOT NULL REFERENCES pgcrew.runs (id),
    key        text NOT NULL CHECK (length(key) BETWEEN 1 AND 256),
    version    integer NOT NULL CHECK (version > 0),
    value      jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, key, version)
);

CREATE TABLE pgcrew.summaries (
    id           bigserial PRIMARY KEY,
    run_id       uuid NOT NULL REFERENCES pgcrew.runs (id),
    summary_type text NOT NULL CHECK (length(summary_type) BETWEEN 1 AND 128),
    content_text text,
    content_json jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((content_text IS NULL) <> (content_json IS NULL))
);
CREATE INDEX summaries_run_idx ON pgcrew.summaries (run_id, summary_type, id);
