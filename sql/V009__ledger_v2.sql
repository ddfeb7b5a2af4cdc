-- pgcrew ledger v2: run-bound chain hashes, closed ledgers, guarded heads and chain anchors, and
-- signed checkpoints (issue #14 item 4, "a ledger that is tamper-evident against anyone without
-- the key").
--
-- Hash formats (public; auditors verify them from the tables alone). The format is stored per run
-- in runs.ledger_format: runs that existed before this migration keep format 1, new runs use 2.
--   v1: hash_n = sha256(hash_{n-1} || int8send(seq) || utf8(tenant_id) || 0x00
--                       || utf8(event_type) || 0x00 || utf8(coalesce(step_key, '')) || 0x00
--                       || int8send(created_at in microseconds since the Unix epoch)
--                       || utf8(payload::text))
--   v2: hash_n = sha256(hash_{n-1} || uuid_send(run_id) || int8send(seq) || utf8(tenant_id) || 0x00
--                       || utf8(event_type) || 0x00 || utf8(coalesce(step_key, '')) || 0x00
--                       || int8send(created_at in microseconds since the Unix epoch)
--                       || utf8(payload::text))
--   hash_0 = 32 zero bytes (both formats).
-- v2 binds every event to its run, so events copied from one run to another no longer verify.
--
-- Signed checkpoints (pgcrew.ledger_checkpoints): instances holding the ledger key (kept outside
-- the database) sign a run's head, mac = HMAC-SHA-256(key, uuid_send(run_id) || int8send(seq) ||
-- head_hash), when the run finishes (in the transaction of the terminal transition) and at most
-- every N appends. Without the key nobody can write a checkpoint that verifies, so an operator
-- with write access to the database can damage a ledger but not forge one.

-- ---------------------------------------------------------------------------------------------
-- The ledger format of each run: 1 for every run that exists now, 2 for runs created from now on.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE pgcrew.runs
    ADD COLUMN ledger_format smallint NOT NULL DEFAULT 1 CHECK (ledger_format IN (1, 2));
ALTER TABLE pgcrew.runs ALTER COLUMN ledger_format SET DEFAULT 2;

-- The v2 chain hash of one event. Declared STABLE like pgcrew.event_hash (and convert_to) so that
-- PostgreSQL inlines it; an IMMUTABLE declaration would prevent inlining.
CREATE FUNCTION pgcrew.event_hash_v2(prev_hash bytea, run_id uuid, seq bigint, tenant_id text,
                                     event_type text, step_key text, created_at timestamptz,
                                     payload jsonb)
RETURNS bytea LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sha256(prev_hash
                  || uuid_send(run_id)
                  || int8send(seq)
                  || convert_to(tenant_id, 'UTF8') || '\x00'::bytea
                  || convert_to(event_type, 'UTF8') || '\x00'::bytea
                  || convert_to(coalesce(step_key, ''), 'UTF8') || '\x00'::bytea
                  || int8send((extract(epoch FROM created_at) * 1000000)::int8)
                  || convert_to(payload::text, 'UTF8'))
$$;

-- The chain hash of one event in a run's ledger format (1 or 2). Inlinable like the two above.
CREATE FUNCTION pgcrew.ledger_event_hash(format smallint, prev_hash bytea, run_id uuid, seq bigint,
                                         tenant_id text, event_type text, step_key text,
                                         created_at timestamptz, payload jsonb)
RETURNS bytea LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN format = 1
                THEN pgcrew.event_hash(prev_hash, seq, tenant_id, event_type, step_key, created_at,
                                       payload)
                ELSE pgcrew.event_hash_v2(prev_hash, run_id, seq, tenant_id, event_type, step_key,
                                          created_at, payload)
           END
$$;

-- ---------------------------------------------------------------------------------------------
-- Guards: the ledger head (runs.ledger_head_seq / ledger_head_hash), the ledger format and the
-- chain anchors are written only by pgcrew's own functions (append_events, purge_run_ledger),
-- which set the transaction-local setting pgcrew.ledger_writer around their write (and clear it
-- right after). Plain SQL writes are refused with SQLSTATE PC005. The table owner can switch
-- triggers off (or set the setting), so this stops mistakes, not a determined operator: the
-- signed checkpoints are what expose a forgery. Roles other than the owner cannot write these
-- tables at all. On the append hot path the guard costs one WHEN test of an AFTER trigger (no
-- function call; a BEFORE trigger would re-fetch and lock the row, a comparison of OLD and NEW
-- measured a few µs more).
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION pgcrew.refuse_ledger_head_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The ledger format may be chosen while nothing has been appended yet.
    IF TG_OP = 'UPDATE' AND OLD.ledger_head_seq = 0 AND NEW.ledger_head_seq = 0
       AND NEW.ledger_head_hash IS NULL THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% of the ledger head of run % is refused: only pgcrew.append_events writes it',
        TG_OP, NEW.id USING ERRCODE = 'PC005';
END $$;

CREATE FUNCTION pgcrew.refuse_chain_anchor_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% of a chain anchor is refused: only pgcrew.purge_run_ledger writes them', TG_OP
        USING ERRCODE = 'PC005';
END $$;

CREATE TRIGGER runs_ledger_head_guard
    AFTER UPDATE OF ledger_head_seq, ledger_head_hash, ledger_format ON pgcrew.runs
    FOR EACH ROW
    WHEN (current_setting('pgcrew.ledger_writer', true) IS DISTINCT FROM 'append')
    EXECUTE FUNCTION pgcrew.refuse_ledger_head_write();

CREATE TRIGGER runs_ledger_head_insert_guard
    BEFORE INSERT ON pgcrew.runs
    FOR EACH ROW WHEN (NEW.ledger_head_seq <> 0 OR NEW.ledger_head_hash IS NOT NULL)
    EXECUTE FUNCTION pgcrew.refuse_ledger_head_write();

CREATE TRIGGER chain_anchors_guard
    BEFORE INSERT OR UPDATE OR DELETE ON pgcrew.chain_anchors
    FOR EACH ROW
    WHEN (current_setting('pgcrew.ledger_writer', true) IS DISTINCT FROM 'purge')
    EXECUTE FUNCTION pgcrew.refuse_chain_anchor_write();

-- ---------------------------------------------------------------------------------------------
-- Appends in the run's ledger format, refused on finished runs (PC003) and stopped by a row
-- beyond the recorded head (PC004): pgcrew.append_events is redefined once, with these rules and
-- the input limits, in V013.
-- ---------------------------------------------------------------------------------------------

-- ---------------------------------------------------------------------------------------------
-- Retention: remove a finished run's events, artifacts and summaries, keeping a chain anchor
-- (the recorded head: last seq and hash) and the run's signed checkpoints. Returns the anchor and
-- what was removed. Refused (SQLSTATE 55000) for unfinished or already purged runs, and
-- (SQLSTATE PC004) when the stored ledger does not end at the recorded head.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION pgcrew.purge_run_ledger(p_run uuid, p_reason text)
RETURNS TABLE (o_last_seq bigint, o_last_hash bytea, o_event_count bigint, o_reason text,
               o_purged_at timestamptz, o_events bigint, o_artifacts bigint, o_summaries bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_tenant text;
    v_state  text;
    v_seq    bigint;
    v_hash   bytea;
    v_last   bigint;
    v_lhash  bytea;
    v_count  bigint;
BEGIN
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION 'say why the ledger of run % is removed', p_run USING ERRCODE = '22023';
    END IF;
    PERFORM pg_advisory_xact_lock(pgcrew.lock_key('run', p_run::text));
    SELECT r.tenant_id, r.state, r.ledger_head_seq, r.ledger_head_hash
      INTO v_tenant, v_state, v_seq, v_hash
      FROM pgcrew.runs r WHERE r.id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'PC002';
    END IF;
    IF v_state NOT IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'run % is %; only finished runs can be purged', p_run, v_state
            USING ERRCODE = '55000';
    END IF;
    IF EXISTS (SELECT 1 FROM pgcrew.chain_anchors a WHERE a.run_id = p_run) OR v_seq = 0 THEN
        RAISE EXCEPTION 'run % has no ledger events (already purged?)', p_run USING ERRCODE = '55000';
    END IF;
    SELECT e.seq, e.hash INTO v_last, v_lhash
      FROM pgcrew.events e WHERE e.run_id = p_run ORDER BY e.seq DESC LIMIT 1;
    IF v_last IS DISTINCT FROM v_seq OR v_lhash IS DISTINCT FROM v_hash THEN
        RAISE EXCEPTION 'the ledger of run % does not end at its recorded head (seq %): check it with pgcrew run verify-ledger before purging',
            p_run, v_seq USING ERRCODE = 'PC004';
    END IF;
    SELECT count(*) INTO v_count FROM pgcrew.events e WHERE e.run_id = p_run;
    PERFORM set_config('pgcrew.ledger_writer', 'purge', true);
    INSERT INTO pgcrew.chain_anchors (run_id, tenant_id, last_seq, last_hash, event_count, reason)
    VALUES (p_run, v_tenant, v_seq, v_hash, v_count, p_reason)
    RETURNING last_seq, last_hash, event_count, reason, purged_at
         INTO o_last_seq, o_last_hash, o_event_count, o_reason, o_purged_at;
    PERFORM set_config('pgcrew.ledger_writer', '', true);
    DELETE FROM pgcrew.events e WHERE e.run_id = p_run;
    GET DIAGNOSTICS o_events = ROW_COUNT;
    DELETE FROM pgcrew.artifacts a WHERE a.run_id = p_run;
    GET DIAGNOSTICS o_artifacts = ROW_COUNT;
    DELETE FROM pgcrew.summaries s WHERE s.run_id = p_run;
    GET DIAGNOSTICS o_summaries = ROW_COUNT;
    RETURN NEXT;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Signed checkpoints. mac = HMAC-SHA-256(key, uuid_send(run_id) || int8send(seq) || head_hash),
-- computed by instances holding the ledger key; the database never sees the key.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE pgcrew.ledger_checkpoints (
    run_id    uuid NOT NULL REFERENCES pgcrew.runs (id),
    seq       bigint NOT NULL CHECK (seq > 0),
    head_hash bytea NOT NULL CHECK (length(head_hash) = 32),
    mac       bytea NOT NULL CHECK (length(mac) = 32),
    -- Signed in the transaction that finished the run (informational: not covered by the MAC).
    final     boolean NOT NULL DEFAULT false,
    signed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);
-- Isolated through the run, like artifacts and summaries (V004).
ALTER TABLE pgcrew.ledger_checkpoints ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON pgcrew.ledger_checkpoints
    USING (EXISTS (SELECT 1 FROM pgcrew.runs r WHERE r.id = run_id
                   AND r.tenant_id = pgcrew.current_tenant()))
    WITH CHECK (EXISTS (SELECT 1 FROM pgcrew.runs r WHERE r.id = run_id
                        AND r.tenant_id = pgcrew.current_tenant()));

-- Store a checkpoint of a run's chain at seq (the caller computed the MAC). The stored event at
-- seq must have head_hash (SQLSTATE PC004 otherwise). Returns false when the events at seq are
-- gone (purged) and nothing was stored. A second signature of the same seq replaces the first.
CREATE FUNCTION pgcrew.add_ledger_checkpoint(p_run uuid, p_seq bigint, p_head_hash bytea,
                                             p_mac bytea, p_final boolean)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_hash bytea;
BEGIN
    SELECT e.hash INTO v_hash FROM pgcrew.events e WHERE e.run_id = p_run AND e.seq = p_seq;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF v_hash <> p_head_hash THEN
        RAISE EXCEPTION 'checkpoint of run % at seq % does not match the stored event hash',
            p_run, p_seq USING ERRCODE = 'PC004';
    END IF;
    INSERT INTO pgcrew.ledger_checkpoints AS c (run_id, seq, head_hash, mac, final)
    VALUES (p_run, p_seq, p_head_hash, p_mac, coalesce(p_final, false))
    ON CONFLICT (run_id, seq) DO UPDATE
       SET mac = EXCLUDED.mac, final = c.final OR EXCLUDED.final, signed_at = now();
    RETURN true;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Verification (without the key), now also reporting what was found. Returns one row: valid, the
-- first bad seq (NULL when valid), the number of events stored and the problem (NULL when valid).
--  * every stored event links to its predecessor and hashes correctly in the run's format;
--  * the stored events end exactly at the recorded head (missing events after the last stored
--    one, a different last hash, or rows beyond the head are reported);
--  * a chain anchor stands in for the events only when the run really was purged: it is
--    finished, no events are left and the anchor is the recorded head. Any other anchor is
--    reported (and does not switch the truncation check off).
-- A full rewrite with recomputed hashes and head passes this check: only the signed checkpoints
-- (verified with the key, outside the database) expose it.
-- ---------------------------------------------------------------------------------------------
DROP FUNCTION pgcrew.verify_run_chain(uuid);
CREATE FUNCTION pgcrew.verify_run_chain(run uuid)
RETURNS TABLE (valid boolean, first_bad_seq bigint, checked bigint, problem text)
LANGUAGE sql STABLE AS $$
    WITH r AS (
        SELECT r.id, r.state, r.ledger_format AS fmt, r.ledger_head_seq AS head_seq,
               r.ledger_head_hash AS head_hash
          FROM pgcrew.runs r WHERE r.id = run
    ),
    ordered AS (
        SELECT e.seq,
               row_number() OVER (ORDER BY e.seq) AS rn,
               e.prev_hash,
               e.hash,
               coalesce(lag(e.hash) OVER (ORDER BY e.seq),
                        '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
                   AS expected_prev,
               pgcrew.ledger_event_hash(r.fmt, e.prev_hash, e.run_id, e.seq, e.tenant_id,
                                        e.event_type, e.step_key, e.created_at, e.payload)
                   AS computed
          FROM pgcrew.events e CROSS JOIN r
         WHERE e.run_id = run
    ),
    row_bad AS (
        SELECT CASE WHEN o.seq <> o.rn THEN o.rn ELSE o.seq END AS bad_seq,
               CASE WHEN o.seq <> o.rn THEN 'event missing or moved'
                    WHEN o.prev_hash <> o.expected_prev THEN 'event does not link to its predecessor'
                    ELSE 'event hash does not match its contents (changed, or copied from another run)'
               END AS problem
          FROM ordered o
         WHERE o.seq <> o.rn OR o.prev_hash <> o.expected_prev OR o.hash <> o.computed
         ORDER BY o.seq
         LIMIT 1
    ),
    last_ev AS (
        SELECT e.seq, e.hash FROM pgcrew.events e WHERE e.run_id = run ORDER BY e.seq DESC LIMIT 1
    ),
    anchor AS (
        SELECT a.last_seq, a.last_hash, a.event_count FROM pgcrew.chain_anchors a WHERE a.run_id = run
    ),
    -- The anchor counts only for a run that really was purged.
    purged AS (
        SELECT 1 FROM anchor a CROSS JOIN r
         WHERE NOT EXISTS (SELECT 1 FROM last_ev)
           AND r.state IN ('completed', 'failed', 'cancelled')
           AND a.last_seq = r.head_seq AND a.last_hash = r.head_hash AND a.event_count = r.head_seq
    ),
    head_bad AS (
        SELECT CASE WHEN coalesce(l.seq, 0) < r.head_seq THEN coalesce(l.seq, 0) + 1
                    WHEN l.seq > r.head_seq THEN r.head_seq + 1
                    ELSE r.head_seq END AS bad_seq,
               CASE WHEN coalesce(l.seq, 0) < r.head_seq
                        THEN 'events missing after the last stored one (recorded head is seq ' || r.head_seq || ')'
                    WHEN l.seq > r.head_seq
                        THEN 'events stored beyond the recorded head (seq ' || r.head_seq || ')'
                    ELSE 'the last event is not the recorded head'
               END AS problem
          FROM r LEFT JOIN last_ev l ON true
         WHERE NOT EXISTS (SELECT 1 FROM purged)
           AND (coalesce(l.seq, 0) <> r.head_seq OR l.hash IS DISTINCT FROM r.head_hash)
           AND (r.head_seq > 0 OR l.seq IS NOT NULL)
    ),
    anchor_bad AS (
        SELECT greatest(1, least(a.last_seq, r.head_seq)) AS bad_seq,
               'chain anchor does not match a purged run (events still stored, run unfinished, or anchor differs from the recorded head)'::text AS problem
          FROM anchor a CROSS JOIN r
         WHERE NOT EXISTS (SELECT 1 FROM purged)
    ),
    bad AS (
        SELECT b.bad_seq, b.problem
          FROM (SELECT bad_seq, problem, 0 AS pri FROM row_bad
                UNION ALL SELECT bad_seq, problem, 1 FROM head_bad
                UNION ALL SELECT bad_seq, problem, 2 FROM anchor_bad) b
         -- Chain and head problems first (the lowest seq); an anchor problem only without them.
         ORDER BY b.pri = 2, b.bad_seq, b.pri
         LIMIT 1
    )
    SELECT NOT EXISTS (SELECT 1 FROM bad),
           (SELECT bad_seq FROM bad),
           (SELECT count(*) FROM pgcrew.events e WHERE e.run_id = run),
           (SELECT problem FROM bad)
$$;
