-- pgcrew V045: a claim that takes tokens no longer prepares pgcrew.rate_limits's CHECK
-- constraints (issue #21, wake-up latency with limits).
--
-- PostgreSQL checks every CHECK constraint of a table on every UPDATE of a row, whatever the
-- columns written, and prepares them again in every statement that writes the table (it reads
-- each expression back from its stored text and plans it). Every claim of a rate-limited queue
-- writes its bucket's `tokens` and `refilled_at` (the one-statement limited claim,
-- sql/queries/queue/claim_fast_limited.sql, and pgcrew.claim_tasks): measured with callgrind on
-- `postgres --single`, preparing the four constraints of V028 was about 130,000 of the 1.24
-- million instructions of a limited claim of one task (a plain claim is 0.62 million).
-- The same rules now live in an AFTER ROW trigger that fires only when a row is inserted or
-- one of the four columns is written (a token update never fires it, and an AFTER trigger,
-- unlike a BEFORE one, does not lock the row first), and refuses as the constraints did:
-- SQLSTATE 23514 (check_violation) with the constraint's name. pgcrew.set_rate_limit refuses
-- bad input before it writes (PC103), as before.

ALTER TABLE pgcrew.rate_limits
    DROP CONSTRAINT rate_limits_scope_check,
    DROP CONSTRAINT rate_limits_name_check,
    DROP CONSTRAINT rate_limits_per_second_check,
    DROP CONSTRAINT rate_limits_burst_check;

CREATE FUNCTION pgcrew.check_rate_limit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_constraint text;
BEGIN
    IF NOT coalesce(NEW.scope IN ('queue', 'kind', 'tenant'), true) THEN
        v_constraint := 'rate_limits_scope_check';
    ELSIF NOT coalesce(length(NEW.name) BETWEEN 1 AND 128, true) THEN
        v_constraint := 'rate_limits_name_check';
    ELSIF NOT coalesce(NEW.per_second > 0 AND NEW.per_second <= 1e9, true) THEN
        v_constraint := 'rate_limits_per_second_check';
    ELSIF NOT coalesce(NEW.burst >= 1, true) THEN
        v_constraint := 'rate_limits_burst_check';
    ELSE
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'new row for relation "rate_limits" violates check constraint "%"', v_constraint
        USING ERRCODE = 'check_violation', CONSTRAINT = v_constraint, SCHEMA = 'pgcrew',
              TABLE = 'rate_limits',
              DETAIL = format('rate limit (%s, %s): %s a second, bursts of %s',
                              NEW.scope, NEW.name, NEW.per_second, NEW.burst);
END $$;
REVOKE ALL ON FUNCTION pgcrew.check_rate_limit() FROM PUBLIC;

CREATE TRIGGER rate_limits_check
    AFTER INSERT OR UPDATE OF scope, name, per_second, burst ON pgcrew.rate_limits
    FOR EACH ROW EXECUTE FUNCTION pgcrew.check_rate_limit();
