-- Moving a tenant between shards (issue #22): the rows of a tenant are copied as they are (its
-- runs with their recorded ledger heads, chain anchors, artifacts and summaries of finished runs)
-- and deleted from the source. The guards that keep ledger heads, chain anchors and finished
-- runs' outputs closed refuse exactly that, so a transfer marks its own transaction:
--   SELECT pgcrew.begin_tenant_transfer('acme');   -- owner only (the table is owner-only)
--   ... COPY / INSERT / DELETE the tenant's rows ...
--   SELECT pgcrew.end_tenant_transfer();
-- The guards let writes through only in a transaction so marked. Only a role that may write
-- pgcrew.tenant_transfers (the owner) can mark one; tenant roles cannot.

CREATE TABLE pgcrew.tenant_transfers (
    xact       xid8 PRIMARY KEY,
    tenant_id  text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON pgcrew.tenant_transfers FROM PUBLIC;

-- Whether the current transaction is a tenant transfer. SECURITY DEFINER so the guards (which
-- run as the writer) can ask without reading the table; it says nothing else.
CREATE FUNCTION pgcrew.in_tenant_transfer() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM pgcrew.tenant_transfers t
                    WHERE t.xact = pg_current_xact_id_if_assigned())
$$;

CREATE FUNCTION pgcrew.begin_tenant_transfer(p_tenant text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO pgcrew.tenant_transfers (xact, tenant_id) VALUES (pg_current_xact_id(), p_tenant)
$$;
REVOKE ALL ON FUNCTION pgcrew.begin_tenant_transfer(text) FROM PUBLIC;

CREATE FUNCTION pgcrew.end_tenant_transfer() RETURNS void
LANGUAGE sql AS $$
    DELETE FROM pgcrew.tenant_transfers WHERE xact = pg_current_xact_id()
$$;
REVOKE ALL ON FUNCTION pgcrew.end_tenant_transfer() FROM PUBLIC;

-- The guards, as before, with the transfer exception first.
CREATE OR REPLACE FUNCTION pgcrew.refuse_ledger_head_write()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    IF pgcrew.in_tenant_transfer() THEN
        RETURN NEW;
    END IF;
    -- The ledger format may be chosen while nothing has been appended yet.
    IF TG_OP = 'UPDATE' AND OLD.ledger_head_seq = 0 AND NEW.ledger_head_seq = 0
       AND NEW.ledger_head_hash IS NULL THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% of the ledger head of run % is refused: only pgcrew.append_events writes it',
        TG_OP, NEW.id USING ERRCODE = 'PC005';
END $function$;

CREATE OR REPLACE FUNCTION pgcrew.refuse_chain_anchor_write()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    IF pgcrew.in_tenant_transfer() THEN
        RETURN coalesce(NEW, OLD);
    END IF;
    RAISE EXCEPTION '% of a chain anchor is refused: only pgcrew.purge_run_ledger writes them', TG_OP
        USING ERRCODE = 'PC005';
END $function$;

CREATE OR REPLACE FUNCTION pgcrew.check_run_output()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_state text;
    v_len   bigint;
BEGIN
    SELECT r.state INTO v_state FROM pgcrew.runs r WHERE r.id = NEW.run_id;
    IF v_state IN ('completed', 'failed', 'cancelled') AND NOT pgcrew.in_tenant_transfer() THEN
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
END $function$;

-- The tables holding a tenant's data, in the order a transfer writes them (and deletes them in
-- reverse): how each one's rows are selected ($1 = the tenant) and, for ids drawn from a
-- sequence, the target's sequence (the copy gets a fresh id there; nothing refers to these ids).
-- Not moved: tasks (a drained tenant has only finished ones: history, deleted with the tenant),
-- events (per run, pgcrew.export_run_events), tenant_roles (roles belong to a cluster: grant
-- them again on the target), schedule_fires (history).
CREATE FUNCTION pgcrew.tenant_tables()
RETURNS TABLE (tbl text, filter text, fresh_id text)
LANGUAGE sql IMMUTABLE AS $$
    VALUES ('tenants', 'id = $1', NULL),
           ('tenant_queue_limits', 'tenant_id = $1', NULL),
           ('queue_backpressure', 'tenant_id = $1', NULL),
           ('queue_pauses', 'tenant_id = $1', NULL),
           ('schedules', 'tenant_id = $1', NULL),
           ('sessions', 'tenant_id = $1', NULL),
           ('runs', 'tenant_id = $1', NULL),
           ('chain_anchors', 'tenant_id = $1', NULL),
           ('ledger_checkpoints', 'run_id IN (SELECT r.id FROM pgcrew.runs r WHERE r.tenant_id = $1)', NULL),
           ('artifacts', 'run_id IN (SELECT r.id FROM pgcrew.runs r WHERE r.tenant_id = $1)', NULL),
           ('summaries', 'run_id IN (SELECT r.id FROM pgcrew.runs r WHERE r.tenant_id = $1)', 'pgcrew.summaries_id_seq'),
           ('run_waits', 'tenant_id = $1', NULL),
           ('run_signals', 'tenant_id = $1', 'pgcrew.run_signals_id_seq'),
           ('budget_reservations', 'tenant_id = $1', NULL),
           ('cost_entries', 'tenant_id = $1', 'pgcrew.cost_entries_id_seq'),
           ('cost_daily', 'tenant_id = $1', NULL)
$$;
REVOKE ALL ON FUNCTION pgcrew.tenant_tables() FROM PUBLIC;

-- A tenant's rows (all but events and tasks) as {"table": [row, ...], ...}, row = to_jsonb of
-- the row (exact: timestamps to the microsecond, numerics, bytea as hex).
CREATE FUNCTION pgcrew.export_tenant(p_tenant text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_out  jsonb := '{}';
    v_rows jsonb;
    t      record;
BEGIN
    FOR t IN SELECT * FROM pgcrew.tenant_tables() LOOP
        EXECUTE format('SELECT coalesce(jsonb_agg(to_jsonb(x)), ''[]'') FROM pgcrew.%I x WHERE %s',
                       t.tbl, t.filter)
           INTO v_rows USING p_tenant;
        v_out := v_out || jsonb_build_object(t.tbl, v_rows);
    END LOOP;
    RETURN v_out;
END $$;
REVOKE ALL ON FUNCTION pgcrew.export_tenant(text) FROM PUBLIC;

-- One run's events, in seq order, as a JSON array of rows.
CREATE FUNCTION pgcrew.export_run_events(p_run uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(to_jsonb(e) ORDER BY e.seq), '[]') FROM pgcrew.events e
     WHERE e.run_id = p_run
$$;
REVOKE ALL ON FUNCTION pgcrew.export_run_events(uuid) FROM PUBLIC;

-- Write what pgcrew.export_tenant returned; only inside a transfer. Returns the rows written.
-- A tenant that already exists here fails on the tenants primary key (23505).
CREATE FUNCTION pgcrew.import_tenant(p_data jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_total bigint := 0;
    v_count bigint;
    t       record;
BEGIN
    IF NOT pgcrew.in_tenant_transfer() THEN
        RAISE EXCEPTION 'pgcrew.import_tenant runs only inside a tenant transfer'
            USING ERRCODE = 'PC130', HINT = 'call pgcrew.begin_tenant_transfer(tenant) first';
    END IF;
    FOR t IN SELECT * FROM pgcrew.tenant_tables() LOOP
        IF t.fresh_id IS NULL THEN
            EXECUTE format('INSERT INTO pgcrew.%I SELECT * FROM jsonb_populate_recordset(NULL::pgcrew.%I, $1)',
                           t.tbl, t.tbl)
              USING coalesce(p_data -> t.tbl, '[]');
        ELSE
            EXECUTE format('INSERT INTO pgcrew.%I SELECT p.* FROM jsonb_array_elements($1) r, '
                           'LATERAL jsonb_populate_record(NULL::pgcrew.%I, '
                           'r || jsonb_build_object(''id'', nextval(%L))) p',
                           t.tbl, t.tbl, t.fresh_id)
              USING coalesce(p_data -> t.tbl, '[]');
        END IF;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        v_total := v_total + v_count;
    END LOOP;
    RETURN v_total;
END $$;
REVOKE ALL ON FUNCTION pgcrew.import_tenant(jsonb) FROM PUBLIC;

-- Write what pgcrew.export_run_events returned; only inside a transfer.
CREATE FUNCTION pgcrew.import_run_events(p_events jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_count bigint;
BEGIN
    IF NOT pgcrew.in_tenant_transfer() THEN
        RAISE EXCEPTION 'pgcrew.import_run_events runs only inside a tenant transfer'
            USING ERRCODE = 'PC130', HINT = 'call pgcrew.begin_tenant_transfer(tenant) first';
    END IF;
    INSERT INTO pgcrew.events SELECT * FROM jsonb_populate_recordset(NULL::pgcrew.events, p_events);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END $$;
REVOKE ALL ON FUNCTION pgcrew.import_run_events(jsonb) FROM PUBLIC;

-- Delete a drained tenant and everything it owns (its finished tasks too); only inside a
-- transfer. Refused (PC131) while it has unfinished tasks or runs pending/running.
CREATE FUNCTION pgcrew.delete_tenant(p_tenant text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_total bigint := 0;
    v_count bigint;
    t       record;
BEGIN
    IF NOT pgcrew.in_tenant_transfer() THEN
        RAISE EXCEPTION 'pgcrew.delete_tenant runs only inside a tenant transfer'
            USING ERRCODE = 'PC130', HINT = 'call pgcrew.begin_tenant_transfer(tenant) first';
    END IF;
    IF EXISTS (SELECT 1 FROM pgcrew.tasks k WHERE k.tenant_id = p_tenant
                  AND k.state NOT IN ('completed', 'discarded', 'cancelled'))
       OR EXISTS (SELECT 1 FROM pgcrew.runs r WHERE r.tenant_id = p_tenant
                     AND r.state IN ('pending', 'running')) THEN
        RAISE EXCEPTION 'tenant % still has unfinished tasks or runs', p_tenant
            USING ERRCODE = 'PC131', HINT = 'drain the tenant first';
    END IF;
    DELETE FROM pgcrew.tasks k WHERE k.tenant_id = p_tenant;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    v_total := v_total + v_count;
    DELETE FROM pgcrew.events e WHERE e.tenant_id = p_tenant;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    v_total := v_total + v_count;
    FOR t IN SELECT x.tbl, x.filter FROM pgcrew.tenant_tables() WITH ORDINALITY x(tbl, filter, fresh_id, n)
              ORDER BY x.n DESC LOOP
        EXECUTE format('DELETE FROM pgcrew.%I x WHERE %s', t.tbl, t.filter) USING p_tenant;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        v_total := v_total + v_count;
    END LOOP;
    RETURN v_total;
END $$;
REVOKE ALL ON FUNCTION pgcrew.delete_tenant(text) FROM PUBLIC;
