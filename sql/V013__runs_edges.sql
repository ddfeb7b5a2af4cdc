-- pgcrew runs at the edges (issue #15): stuck runs are judged by their lease, not their age.

-- A run counts as stuck when it is running with no live lease (expired or none) for longer than
-- an hour, when its lease expired, or when its instance is gone; a run whose lease is being
-- renewed is never listed, however long it has been running.
CREATE OR REPLACE VIEW pgcrew.stuck_runs AS
SELECT r.id AS run_id,
       r.tenant_id,
       r.agent_name,
       r.state,
       r.instance_id,
       r.lease_owner,
       r.lease_expires_at,
       r.started_at,
       now() - coalesce(r.started_at, r.created_at) AS age,
       CASE
           WHEN r.state = 'running' AND r.lease_expires_at < now() THEN 'run lease expired'
           WHEN r.state = 'running' AND r.instance_id IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM pgcrew.instances i WHERE i.id = r.instance_id) THEN 'instance gone'
           WHEN r.state = 'running' THEN 'running longer than 1 hour without a lease'
           ELSE 'pending longer than 1 hour'
       END AS reason
FROM pgcrew.runs r
WHERE (r.state = 'running'
       AND (r.lease_expires_at IS NULL OR r.lease_expires_at <= now())
       AND (r.started_at < now() - interval '1 hour'
            OR r.lease_expires_at < now()
            OR (r.instance_id IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM pgcrew.instances i WHERE i.id = r.instance_id))))
   OR (r.state = 'pending' AND r.created_at < now() - interval '1 hour');

-- =============================================================================================
-- Limits on every stored run input (issue #15, "unbounded inputs"). Hard database caps; the
-- library refuses earlier (and may be configured lower, never higher). Every refusal raises
-- SQLSTATE PC040 with DETAIL = {"field": ..., "size": ..., "limit": ...} and stores nothing.
--
--   | input                                  | cap            | measured as                   |
--   | events.payload                         | 1 MiB          | octet_length(payload::text)   |
--   | events.event_type                      | 1..128 bytes   | octet_length                  |
--   | events.step_key                        | 512 bytes      | octet_length                  |
--   | artifacts.key                          | 1..256 chars   | (V002 CHECK)                  |
--   | artifacts.value                        | 1 MiB          | octet_length(value::text)     |
--   | summaries.summary_type                 | 1..128 chars   | (V002 CHECK)                  |
--   | summaries.content_text / content_json  | 1 MiB          | octet_length (json: ::text)   |
--   | runs.prompt                            | 1 MiB          | octet_length                  |
--   | runs.metadata                          | 64 KiB         | octet_length(metadata::text)  |
--   | runs.agent_name                        | 128 bytes      | octet_length                  |
-- =============================================================================================
CREATE FUNCTION pgcrew.max_input_bytes(p_field text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE p_field
        WHEN 'event payload' THEN 1048576
        WHEN 'event type' THEN 128
        WHEN 'step key' THEN 512
        WHEN 'artifact value' THEN 1048576
        WHEN 'summary content' THEN 1048576
        WHEN 'run prompt' THEN 1048576
        WHEN 'run metadata' THEN 65536
        WHEN 'run agent name' THEN 128
    END
$$;

-- Raise PC040 for an input of p_size bytes over its cap p_limit.
CREATE FUNCTION pgcrew.refuse_too_large(p_field text, p_size bigint, p_limit bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is % bytes; at most % are allowed', p_field, p_size, p_limit
        USING ERRCODE = 'PC040',
              DETAIL = json_build_object('field', p_field, 'size', p_size, 'limit', p_limit)::text;
END $$;

-- Appends (secret-keyed run lock, V008), with the ledger v2 rules (V009) and the limits:
--  * hashed in the run's ledger format (v2 for new runs);
--  * refused on finished (and so on purged) runs: SQLSTATE PC003;
--  * a row already stored at the next seq (written outside this function, beyond the recorded
--    head) stops the append with SQLSTATE PC004 instead of a duplicate-key error;
--  * payload, event type and step key within their caps (PC040). The payload text is computed
--    once, for both the size check and the hash (the hash expression of pgcrew.event_hash /
--    event_hash_v2 is inlined here).
-- Any refusal aborts the whole batch (nothing is stored).
CREATE OR REPLACE FUNCTION pgcrew.append_events(p_run uuid, p_lease_token bigint, p_types text[],
                                     p_step_keys text[], p_payloads jsonb[], p_dedupe boolean[])
RETURNS TABLE (o_seq bigint, o_hash bytea, o_created_at timestamptz, o_inserted boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_tenant  text;
    v_token   bigint;
    v_owner   text;
    v_expires timestamptz;
    v_state   text;
    v_format  smallint;
    v_seq     bigint;
    v_hash    bytea;
    v_prev    bytea;
    v_now     timestamptz;
    v_now_us  bytea;
    v_tenant_b bytea;
    v_first   bigint;
    v_done    text;
    v_ignore  text;
    v_text    text;
    v_len     integer;
    i         integer;
BEGIN
    PERFORM pg_advisory_xact_lock(pgcrew.lock_key('run', p_run::text));
    SELECT r.tenant_id, r.lease_token, r.lease_owner, r.lease_expires_at, r.state, r.ledger_format,
           r.ledger_head_seq, r.ledger_head_hash
      INTO v_tenant, v_token, v_owner, v_expires, v_state, v_format, v_seq, v_hash
      FROM pgcrew.runs r WHERE r.id = p_run;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'PC002';
    END IF;
    IF p_lease_token IS NOT NULL
       AND (v_token <> p_lease_token OR v_owner IS NULL OR v_expires IS NULL OR v_expires <= now()) THEN
        RAISE EXCEPTION 'the lease on run % with token % is no longer held (current token %)',
            p_run, p_lease_token, v_token USING ERRCODE = 'PC001';
    END IF;
    IF v_state IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'run % is %: its ledger is closed (appends to finished or purged runs are refused)',
            p_run, v_state USING ERRCODE = 'PC003';
    END IF;
    IF v_hash IS NULL THEN
        v_seq := 0;
        v_hash := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
    END IF;
    v_now := clock_timestamp();
    v_now_us := int8send((extract(epoch FROM v_now) * 1000000)::int8);
    v_tenant_b := convert_to(v_tenant, 'UTF8') || '\x00'::bytea;
    FOR i IN 1 .. coalesce(array_length(p_types, 1), 0) LOOP
        v_len := octet_length(p_types[i]);
        IF v_len IS NULL OR v_len = 0 OR v_len > 128 THEN
            PERFORM pgcrew.refuse_too_large('event type', coalesce(v_len, 0), 128);
        END IF;
        v_len := octet_length(p_step_keys[i]);
        IF v_len > 512 THEN
            PERFORM pgcrew.refuse_too_large('step key', v_len, 512);
        END IF;
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
        v_text := p_payloads[i]::text;
        v_len := octet_length(v_text);
        IF v_len IS NULL OR v_len > 1048576 THEN
            PERFORM pgcrew.refuse_too_large('event payload', coalesce(v_len, 0), 1048576);
        END IF;
        v_prev := v_hash;
        v_seq := v_seq + 1;
        -- pgcrew.event_hash (v1) / pgcrew.event_hash_v2, on the payload text computed above.
        IF v_format = 1 THEN
            v_hash := sha256(v_prev || int8send(v_seq) || v_tenant_b
                             || convert_to(p_types[i], 'UTF8') || '\x00'::bytea
                             || convert_to(coalesce(p_step_keys[i], ''), 'UTF8') || '\x00'::bytea
                             || v_now_us || convert_to(v_text, 'UTF8'));
        ELSE
            v_hash := sha256(v_prev || uuid_send(p_run) || int8send(v_seq) || v_tenant_b
                             || convert_to(p_types[i], 'UTF8') || '\x00'::bytea
                             || convert_to(coalesce(p_step_keys[i], ''), 'UTF8') || '\x00'::bytea
                             || v_now_us || convert_to(v_text, 'UTF8'));
        END IF;
        INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, step_key, payload,
                                   prev_hash, hash, created_at, dedupe)
        VALUES (p_run, v_seq, v_tenant, p_types[i], p_step_keys[i], p_payloads[i],
                v_prev, v_hash, v_now, coalesce(p_dedupe[i], false))
        ON CONFLICT (run_id, seq) DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the ledger of run % already has an event at seq %, beyond its recorded head (seq %): it was written outside pgcrew.append_events; check it with pgcrew run verify-ledger',
                p_run, v_seq, v_seq - 1 USING ERRCODE = 'PC004';
        END IF;
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
        v_ignore := set_config('pgcrew.ledger_writer', 'append', true);
        UPDATE pgcrew.runs SET ledger_head_seq = v_seq, ledger_head_hash = v_hash WHERE id = p_run;
        v_ignore := set_config('pgcrew.ledger_writer', '', true);
        v_done := coalesce(current_setting('pgcrew.notified_runs', true), '');
        IF position(p_run::text IN v_done) = 0 THEN
            PERFORM pg_notify('pgcrew_run_event',
                json_build_object('run_id', p_run, 'seq', v_first)::text);
            PERFORM set_config('pgcrew.notified_runs', v_done || p_run::text || ',', true);
        END IF;
    END IF;
END $$;

-- Run inputs a caller fills at creation (prompt, metadata, agent name). A trigger on those
-- columns only, so lease renewals and ledger-head updates never pay for it. Transition outcome
-- columns (response_text, error_message, ...) are not capped: refusing a terminal transition
-- would strand the run.
CREATE FUNCTION pgcrew.check_run_inputs() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_len bigint;
BEGIN
    v_len := octet_length(NEW.prompt);
    IF v_len > 1048576 THEN
        PERFORM pgcrew.refuse_too_large('run prompt', v_len, 1048576);
    END IF;
    v_len := octet_length(NEW.metadata::text);
    IF v_len > 65536 THEN
        PERFORM pgcrew.refuse_too_large('run metadata', v_len, 65536);
    END IF;
    v_len := octet_length(NEW.agent_name);
    IF v_len > 128 THEN
        PERFORM pgcrew.refuse_too_large('run agent name', v_len, 128);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER runs_input_limits
    BEFORE INSERT OR UPDATE OF prompt, metadata, agent_name ON pgcrew.runs
    FOR EACH ROW EXECUTE FUNCTION pgcrew.check_run_inputs();

-- =============================================================================================
-- Artifacts and summaries: written under the run's lease, never to finished runs (issue #15).
--  * pgcrew.put_artifact / pgcrew.add_summary: lock the run like appends; PC002 unknown run,
--    PC041 finished run, PC001 when p_lease_token is set and is not the current, unexpired lease.
--  * A BEFORE INSERT OR UPDATE trigger refuses rows of finished runs (PC041) and oversized values
--    (PC040) for any writer, and CHECK constraints (NOT VALID: existing rows are not re-checked)
--    cap the values in the tables themselves.
-- =============================================================================================
ALTER TABLE pgcrew.artifacts
    ADD CONSTRAINT artifacts_value_size CHECK (octet_length(value::text) <= 1048576) NOT VALID;
ALTER TABLE pgcrew.summaries
    ADD CONSTRAINT summaries_content_size
        CHECK (coalesce(octet_length(content_text), 0) <= 1048576
               AND coalesce(octet_length(content_json::text), 0) <= 1048576) NOT VALID;

CREATE FUNCTION pgcrew.check_run_output() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
    v_len   bigint;
BEGIN
    SELECT r.state INTO v_state FROM pgcrew.runs r WHERE r.id = NEW.run_id;
    IF v_state IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'run % is %: its % cannot be changed (finished runs are closed)',
            NEW.run_id, v_state, TG_TABLE_NAME
            USING ERRCODE = 'PC041', DETAIL = v_state;
    END IF;
    IF TG_TABLE_NAME = 'artifacts' THEN
        v_len := octet_length(NEW.value::text);
        IF v_len > 1048576 THEN
            PERFORM pgcrew.refuse_too_large('artifact value', v_len, 1048576);
        END IF;
    ELSE
        v_len := greatest(coalesce(octet_length(NEW.content_text), 0),
                          coalesce(octet_length(NEW.content_json::text), 0));
        IF v_len > 1048576 THEN
            PERFORM pgcrew.refuse_too_large('summary content', v_len, 1048576);
        END IF;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER artifacts_open_run BEFORE INSERT OR UPDATE ON pgcrew.artifacts
    FOR EACH ROW EXECUTE FUNCTION pgcrew.check_run_output();
CREATE TRIGGER summaries_open_run BEFORE INSERT OR UPDATE ON pgcrew.summaries
    FOR EACH ROW EXECUTE FUNCTION pgcrew.check_run_output();

-- Lock a run for an artifact or summary write and check it: PC002 unknown, PC041 finished,
-- PC001 lease not held (when p_lease_token is set).
CREATE FUNCTION pgcrew.check_run_writable(p_run uuid, p_lease_token bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_state   text;
    v_token   bigint;
    v_owner   text;
    v_expires timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(pgcrew.lock_key('run', p_run::text));
    SELECT r.state, r.lease_token, r.lease_owner, r.lease_expires_at
      INTO v_state, v_token, v_owner, v_expires
      FROM pgcrew.runs r WHERE r.id = p_run;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'PC002';
    END IF;
    IF v_state IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'run % is %: its artifacts and summaries cannot be changed (finished runs are closed)',
            p_run, v_state USING ERRCODE = 'PC041', DETAIL = v_state;
    END IF;
    IF p_lease_token IS NOT NULL
       AND (v_token <> p_lease_token OR v_owner IS NULL OR v_expires IS NULL OR v_expires <= now()) THEN
        RAISE EXCEPTION 'the lease on run % with token % is no longer held (current token %)',
            p_run, p_lease_token, v_token USING ERRCODE = 'PC001';
    END IF;
END $$;

-- Store a new version of an artifact (version = previous + 1). Returns the stored row.
CREATE FUNCTION pgcrew.put_artifact(p_run uuid, p_lease_token bigint, p_key text, p_value jsonb)
RETURNS SETOF pgcrew.artifacts LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgcrew.check_run_writable(p_run, p_lease_token);
    RETURN QUERY
    INSERT INTO pgcrew.artifacts (run_id, key, version, value)
    SELECT p_run, p_key, coalesce(max(a.version), 0) + 1, p_value
      FROM pgcrew.artifacts a
     WHERE a.run_id = p_run AND a.key = p_key
    RETURNING *;
END $$;

-- Add a summary (exactly one of p_text, p_json). Returns the stored row.
CREATE FUNCTION pgcrew.add_summary(p_run uuid, p_lease_token bigint, p_type text, p_text text,
                                   p_json jsonb)
RETURNS SETOF pgcrew.summaries LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgcrew.check_run_writable(p_run, p_lease_token);
    RETURN QUERY
    INSERT INTO pgcrew.summaries (run_id, summary_type, content_text, content_json)
    VALUES (p_run, p_type, p_text, p_json)
    RETURNING *;
END $$;

-- =============================================================================================
-- Retention of finished runs (issue #15, "growth"), run by the leader's maintenance when
-- ClientConfig::run_retention is set (off by default).
--
-- What goes: a finished run's events (through pgcrew.purge_run_ledger, which writes its chain
-- anchor), artifacts, summaries, non-final checkpoints, cost entries (folded into
-- pgcrew.cost_daily first), and the run's prompt and response text.
-- What stays: the run row (id, tenant, state, tokens, cost, timestamps, recorded ledger head:
-- what the anchor is verified against, and the row forks, tasks, reservations and sessions refer
-- to), its chain anchor, and its signed checkpoint at the head (the final one), so the anchor
-- still verifies with the ledger key. runs.retained_at marks the run as done.
-- =============================================================================================
ALTER TABLE pgcrew.runs ADD COLUMN retained_at timestamptz;
CREATE INDEX runs_retention_idx ON pgcrew.runs (finalized_at)
    WHERE retained_at IS NULL AND state IN ('completed', 'failed', 'cancelled');

-- Cost totals per tenant, UTC day, category and model of cost entries removed by retention.
CREATE TABLE pgcrew.cost_daily (
    tenant_id         text NOT NULL REFERENCES pgcrew.tenants (id),
    day               date NOT NULL,
    category          text NOT NULL,
    model             text NOT NULL DEFAULT '',
    entries           bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cost_usd          numeric(20, 10) NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day, category, model)
);
ALTER TABLE pgcrew.cost_daily ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON pgcrew.cost_daily
    USING (tenant_id = (SELECT pgcrew.current_tenant()))
    WITH CHECK (tenant_id = (SELECT pgcrew.current_tenant()));

-- tenant_costs: the aggregate of retained entries plus the live entries (same columns as V004).
CREATE OR REPLACE VIEW pgcrew.tenant_costs WITH (security_invoker = true) AS
SELECT u.tenant_id,
       u.day,
       u.category,
       u.model,
       sum(u.entries)::bigint AS entries,
       sum(u.prompt_tokens)::bigint AS prompt_tokens,
       sum(u.completion_tokens)::bigint AS completion_tokens,
       sum(u.cost_usd) AS cost_usd
FROM (
    SELECT c.tenant_id,
           (c.created_at AT TIME ZONE 'UTC')::date AS day,
           c.category,
           coalesce(c.model, '') AS model,
           1::bigint AS entries,
           c.prompt_tokens,
           c.completion_tokens,
           c.cost_usd
      FROM pgcrew.cost_entries c
    UNION ALL
    SELECT d.tenant_id, d.day, d.category, d.model, d.entries, d.prompt_tokens,
           d.completion_tokens, d.cost_usd
      FROM pgcrew.cost_daily d
) u
GROUP BY u.tenant_id, u.day, u.category, u.model;

-- One bounded pass: retain up to p_batch finished runs finalized more than p_older_than_us
-- microseconds ago (oldest first; rows locked by others are skipped). A run whose stored ledger
-- does not end at its recorded head keeps its events (evidence; a WARNING is raised) and loses
-- the rest. Returns one row per retained run.
CREATE FUNCTION pgcrew.retain_finished_runs(p_older_than_us bigint, p_batch integer)
RETURNS TABLE (o_run uuid, o_events bigint, o_artifacts bigint, o_summaries bigint,
               o_checkpoints bigint, o_cost_entries bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_run     record;
    v_last    bigint;
    v_lhash   bytea;
    v_n       bigint;
    v_ignore  text;
BEGIN
    IF p_older_than_us IS NULL OR p_older_than_us < 0 OR p_batch IS NULL OR p_batch < 1 THEN
        RAISE EXCEPTION 'retention needs an age >= 0 and a batch >= 1' USING ERRCODE = '22023';
    END IF;
    FOR v_run IN
        SELECT r.id, r.ledger_head_seq, r.ledger_head_hash
          FROM pgcrew.runs r
         WHERE r.retained_at IS NULL
           AND r.state IN ('completed', 'failed', 'cancelled')
           AND r.finalized_at < now() - p_older_than_us * interval '1 microsecond'
         ORDER BY r.finalized_at
         LIMIT p_batch
         FOR UPDATE SKIP LOCKED
    LOOP
        o_run := v_run.id;
        o_events := 0;
        o_artifacts := 0;
        o_summaries := 0;
        IF v_run.ledger_head_seq > 0
           AND NOT EXISTS (SELECT 1 FROM pgcrew.chain_anchors a WHERE a.run_id = v_run.id) THEN
            v_last := NULL;
            v_lhash := NULL;
            SELECT e.seq, e.hash INTO v_last, v_lhash
              FROM pgcrew.events e WHERE e.run_id = v_run.id ORDER BY e.seq DESC LIMIT 1;
            IF v_last IS NOT DISTINCT FROM v_run.ledger_head_seq
               AND v_lhash IS NOT DISTINCT FROM v_run.ledger_head_hash THEN
                SELECT p.o_events, p.o_artifacts, p.o_summaries
                  INTO o_events, o_artifacts, o_summaries
                  FROM pgcrew.purge_run_ledger(v_run.id, 'retention') p;
            ELSE
                RAISE WARNING 'retention: the ledger of run % does not end at its recorded head; its events are kept (check it with pgcrew run verify-ledger)',
                    v_run.id;
            END IF;
        END IF;
        DELETE FROM pgcrew.artifacts a WHERE a.run_id = v_run.id;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        o_artifacts := o_artifacts + v_n;
        DELETE FROM pgcrew.summaries s WHERE s.run_id = v_run.id;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        o_summaries := o_summaries + v_n;
        -- Keep the checkpoint at the recorded head (the final, signed one) and any marked final.
        DELETE FROM pgcrew.ledger_checkpoints c
         WHERE c.run_id = v_run.id AND c.seq <> v_run.ledger_head_seq AND NOT c.final;
        GET DIAGNOSTICS o_checkpoints = ROW_COUNT;
        WITH gone AS (
            DELETE FROM pgcrew.cost_entries c WHERE c.run_id = v_run.id
            RETURNING c.tenant_id, c.created_at, c.category, c.model, c.prompt_tokens,
                      c.completion_tokens, c.cost_usd
        ), folded AS (
            INSERT INTO pgcrew.cost_daily AS d (tenant_id, day, category, model, entries,
                                                prompt_tokens, completion_tokens, cost_usd)
            SELECT g.tenant_id, (g.created_at AT TIME ZONE 'UTC')::date, g.category,
                   coalesce(g.model, ''), count(*), sum(g.prompt_tokens), sum(g.completion_tokens),
                   sum(g.cost_usd)
              FROM gone g
             GROUP BY 1, 2, 3, 4
            ON CONFLICT (tenant_id, day, category, model) DO UPDATE
               SET entries = d.entries + EXCLUDED.entries,
                   prompt_tokens = d.prompt_tokens + EXCLUDED.prompt_tokens,
                   completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
                   cost_usd = d.cost_usd + EXCLUDED.cost_usd
            RETURNING 1
        )
        SELECT count(*) INTO o_cost_entries FROM gone;
        UPDATE pgcrew.runs r
           SET prompt = NULL, response_text = NULL, retained_at = now()
         WHERE r.id = v_run.id;
        RETURN NEXT;
    END LOOP;
END $$;

-- Functions: nothing for PUBLIC (as V010; per-schema default privileges cannot revoke the global
-- default, so every migration creating functions revokes again).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgcrew FROM PUBLIC;
