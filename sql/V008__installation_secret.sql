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

-- The other lock takers are redefined with the secret-keyed lock in the migrations that change
-- them anyway: pgcrew.append_events (V009, V013) and pgcrew.claim_tasks (V011); the run
-- admission lock is sql/queries/runs/lock_tenant.sql.
