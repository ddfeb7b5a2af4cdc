-- pgcrew V019: submit agent runs from SQL (issue #18, item 2).
--
--     SELECT pgcrew.submit_run(p_agent => 'support', p_tenant => 'acme',
--                              p_session => 'user-42', p_input => '{"prompt": "Where is A-1?"}');
--
-- returns the new run's id. It does what the library's submit does, in the caller's
-- transaction: the run (pending), its `run_created` ledger event (through
-- pgcrew.append_events, so the hash chain and the run's lock key are the library's) and a task
-- of kind `pgcrew.agent_run` on the agent's queue `agent.<name>` (unique key
-- `agent_run:<run>`, tenant and run set), so any instance hosting the agent runs it. Nothing is
-- visible to the instances before the caller commits; a rollback leaves nothing behind.
--
-- The writes live in one function, pgcrew.create_agent_run, which the library's
-- `AgentRuntime::submit` calls too; pgcrew.submit_run validates, resolves the session and calls
-- it. Bad input is refused before anything is written:
--   22004  an explicit NULL p_agent, p_tenant or p_input
--   22023  an identifier that is empty, longer than 128 bytes or has control characters; an
--          input that is not a JSON object or has no non-blank string "prompt"
--   42501  a tenant role submitting for another tenant, or a role bound to no tenant that is
--          not an operator (the owner of the pgcrew tables, or a member of it)
--   PC010  the tenant does not exist
--   PC060  the agent is not registered (no row in pgcrew.agents)
--   PC040  a prompt (1 MiB) or metadata (64 KiB) over its cap (the runs triggers)
--
-- Tenant roles (pgcrew.grant_tenant_role) may call it for their own tenant only: it is
-- SECURITY DEFINER (a tenant role has no write privilege on the tables) and checks
-- pgcrew.current_tenant(), which reads the protected role mapping, not a setting.

-- The writes of a submit: run, run_created event, agent-run task. Callers validate first (the
-- library and pgcrew.submit_run); not granted to tenant roles.
CREATE FUNCTION pgcrew.create_agent_run(p_agent text, p_tenant text, p_session uuid,
                                        p_prompt text, p_metadata jsonb DEFAULT '{}')
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_run uuid := gen_random_uuid();
BEGIN
    IF p_session IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pgcrew.sessions s WHERE s.id = p_session AND s.tenant_id = p_tenant) THEN
        RAISE EXCEPTION 'session % is not a session of tenant %', p_session, p_tenant
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO pgcrew.runs (id, tenant_id, session_id, agent_name, prompt, metadata)
    VALUES (v_run, p_tenant, p_session, p_agent, p_prompt, coalesce(p_metadata, '{}'));
    -- The same payload as the library's create_run.
    PERFORM pgcrew.append_events(
        v_run, NULL, ARRAY['run_created'], ARRAY[NULL::text],
        ARRAY[jsonb_build_object('state', 'pending', 'agent_name', p_agent,
                                 'session_id', p_session, 'parent_run_id', NULL,
                                 'forked_at_seq', NULL)],
        ARRAY[false]);
    PERFORM pgcrew.enqueue_task(
        p_queue => 'agent.' || p_agent, p_kind => 'pgcrew.agent_run', p_tenant => p_tenant,
        p_run => v_run, p_payload => jsonb_build_object('run_id', v_run),
        p_unique_key => 'agent_run:' || v_run);
    RETURN v_run;
END $$;
REVOKE ALL ON FUNCTION pgcrew.create_agent_run(text, text, uuid, text, jsonb) FROM PUBLIC;

-- Refuse a bad text identifier (as the library's validate_text_id): 22023 naming it.
CREATE FUNCTION pgcrew.check_text_id(p_what text, p_value text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value = '' OR octet_length(p_value) > 128 OR p_value ~ '[\u0001-\u001f\u007f-\u009f]' THEN
        RAISE EXCEPTION 'invalid %: %', p_what,
            CASE WHEN p_value = '' THEN 'must not be empty'
                 WHEN octet_length(p_value) > 128
                     THEN format('is %s bytes long; at most 128 are allowed', octet_length(p_value))
                 ELSE 'must not contain control characters' END
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgcrew.check_text_id(text, text) FROM PUBLIC;

CREATE FUNCTION pgcrew.submit_run(p_agent text, p_tenant text, p_session text DEFAULT NULL,
                                  p_input jsonb DEFAULT '{}')
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_caller  text := CASE WHEN current_setting('role') = 'none' THEN session_user::text
                           ELSE current_setting('role') END;
    v_bound   text := pgcrew.current_tenant();
    v_prompt  text;
    v_session uuid;
BEGIN
    IF p_agent IS NULL OR p_tenant IS NULL OR p_input IS NULL THEN
        RAISE EXCEPTION 'pgcrew.submit_run: % must not be NULL',
            CASE WHEN p_agent IS NULL THEN 'p_agent' WHEN p_tenant IS NULL THEN 'p_tenant'
                 ELSE 'p_input' END
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'p_agent and p_tenant are required; p_input defaults to ''{}'' but must carry {"prompt": "..."}; omit p_session for a run without a session';
    END IF;
    PERFORM pgcrew.check_text_id('agent name', p_agent);
    PERFORM pgcrew.check_text_id('tenant id', p_tenant);
    IF p_session IS NOT NULL THEN
        PERFORM pgcrew.check_text_id('session identifier', p_session);
    END IF;
    -- Who may submit for p_tenant: a role bound to it, or an operator. Checked before the
    -- tenant's existence, so a tenant role learns nothing about other tenants.
    IF v_bound IS NOT NULL AND v_bound <> p_tenant THEN
        RAISE EXCEPTION 'permission denied: role % may submit runs for its own tenant only', v_caller
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF v_bound IS NULL AND NOT pg_has_role(v_caller,
            (SELECT c.relowner FROM pg_class c WHERE c.oid = 'pgcrew.runs'::regclass), 'USAGE') THEN
        RAISE EXCEPTION 'permission denied: role % is bound to no tenant', v_caller
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'bind it with pgcrew.grant_tenant_role(role, tenant), or submit as the pgcrew owner';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgcrew.tenants t WHERE t.id = p_tenant) THEN
        RAISE EXCEPTION 'tenant "%" does not exist', p_tenant
            USING ERRCODE = 'PC010', HINT = 'create it first: pgcrew tenants create';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgcrew.agents a WHERE a.name = p_agent) THEN
        RAISE EXCEPTION 'agent "%" is not registered', p_agent
            USING ERRCODE = 'PC060',
                  HINT = 'an instance hosting it registers it on start (Client::builder(..).agent(def)); see pgcrew.agents';
    END IF;
    IF jsonb_typeof(p_input) <> 'object' THEN
        RAISE EXCEPTION 'invalid input: must be a JSON object such as {"prompt": "..."}, not %',
            jsonb_typeof(p_input) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coalesce(jsonb_typeof(p_input -> 'prompt'), 'null') <> 'string' THEN
        RAISE EXCEPTION 'invalid input: "prompt" must be a string (the user''s message)'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'p_input => ''{"prompt": "..."}''';
    END IF;
    v_prompt := p_input ->> 'prompt';
    IF v_prompt !~ '[^[:space:]]' THEN
        RAISE EXCEPTION 'invalid prompt: must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_session IS NOT NULL THEN
        INSERT INTO pgcrew.sessions (id, tenant_id, identifier)
        VALUES (gen_random_uuid(), p_tenant, p_session)
        ON CONFLICT (tenant_id, identifier) DO UPDATE SET updated_at = now()
        RETURNING id INTO v_session;
    END IF;
    -- The input's other keys are the run's metadata.
    RETURN pgcrew.create_agent_run(p_agent, p_tenant, v_session, v_prompt, p_input - 'prompt');
END $$;
REVOKE ALL ON FUNCTION pgcrew.submit_run(text, text, text, jsonb) FROM PUBLIC;

-- Tenant roles may submit (for their own tenant): grant_tenant_access grants submit_run too
-- (the rest is V010's), and the roles bound before this migration get it now.
CREATE OR REPLACE FUNCTION pgcrew.grant_tenant_access(role_name text) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA pgcrew TO %I', role_name);
    FOR t IN
        SELECT p.oid::regprocedure::text
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'pgcrew'
           AND (p.proname IN ('current_tenant', 'verify_run_chain', 'ledger_event_hash',
                              'submit_run')
                OR p.proname LIKE 'event\_hash%')
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', t, role_name);
    END LOOP;
    FOR t IN
        SELECT c.relname
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'pgcrew'
          AND ((c.relkind IN ('r', 'p') AND c.relrowsecurity AND c.relname <> 'tenant_roles')
               OR (c.relkind = 'v' AND c.relname IN ('tenant_costs', 'budget_status')))
        ORDER BY c.relname
    LOOP
        EXECUTE format('GRANT SELECT ON pgcrew.%I TO %I', t, role_name);
        RETURN NEXT t;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgcrew.grant_tenant_access(text) FROM PUBLIC;

DO $$
DECLARE
    r text;
BEGIN
    FOR r IN SELECT ro.rolname FROM pgcrew.tenant_roles m JOIN pg_roles ro ON ro.oid = m.role_oid
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION pgcrew.submit_run(text, text, text, jsonb) TO %I', r);
    END LOOP;
END $$;
