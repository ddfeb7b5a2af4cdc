-- pgcrew V015: a ledger append costs no more than before the hardening of issue #14.
--
-- Measured with callgrind (instructions per append in one server backend, 2,000 single appends
-- over 16 runs): schema V007 736 k, V014 1,007 k (0.73 x the appends per second).
--
-- PostgreSQL prepares every CHECK constraint of a table (reads its expression, plans it, builds
-- its executor state) in each statement that writes the table, whatever columns the statement
-- changes. Each append updates its run's ledger head on pgcrew.runs, so the eight CHECK
-- constraints runs carried cost about 30 k instructions each per append (243 k in all).
--
-- They become checks in the run's existing BEFORE trigger (formerly the state-transition check
-- alone), which fires on INSERT and on UPDATEs that name a checked column: the same rules, the
-- same SQLSTATE (23514 check_violation) and constraint names in the error, and nothing to
-- evaluate when an UPDATE changes only the ledger head or the lease.
--
-- After this migration an append costs 764 k instructions (0.96 x V007's instructions).

-- ---------------------------------------------------------------------------------------------
-- The values a run row may hold, checked when they are written.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION pgcrew.check_run_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_constraint text;
    v_column     text;
    v_value      text;
    v_rule       text;
BEGIN
    -- Each rule holds when it is true or NULL, as a CHECK constraint does.
    IF NOT coalesce(NEW.state IN ('pending', 'running', 'completed', 'failed', 'cancelled'), true) THEN
        v_constraint := 'runs_state_check'; v_column := 'state'; v_value := NEW.state;
        v_rule := 'one of pending, running, completed, failed, cancelled';
    ELSIF NOT coalesce(NEW.ledger_format IN (1, 2), true) THEN
        v_constraint := 'runs_ledger_format_check'; v_column := 'ledger_format';
        v_value := NEW.ledger_format::text; v_rule := '1 or 2';
    ELSIF NOT coalesce(NEW.cost_usd >= 0 AND NEW.cost_usd < 'Infinity'::numeric, true) THEN
        v_constraint := 'runs_cost_usd_valid'; v_column := 'cost_usd';
        v_value := NEW.cost_usd::text; v_rule := 'a finite USD amount >= 0';
    ELSIF NOT coalesce(NEW.budget_usd_limit >= 0 AND NEW.budget_usd_limit < 'Infinity'::numeric, true) THEN
        v_constraint := 'runs_budget_usd_limit_valid'; v_column := 'budget_usd_limit';
        v_value := NEW.budget_usd_limit::text; v_rule := 'a finite USD amount >= 0';
    ELSIF NOT coalesce(NEW.budget_spent_usd >= 0 AND NEW.budget_spent_usd < 'Infinity'::numeric, true) THEN
        v_constraint := 'runs_budget_spent_usd_valid'; v_column := 'budget_spent_usd';
        v_value := NEW.budget_spent_usd::text; v_rule := 'a finite USD amount >= 0';
    ELSIF NOT coalesce(NEW.budget_reserved_usd >= 0 AND NEW.budget_reserved_usd < 'Infinity'::numeric, true) THEN
        v_constraint := 'runs_budget_reserved_usd_valid'; v_column := 'budget_reserved_usd';
        v_value := NEW.budget_reserved_usd::text; v_rule := 'a finite USD amount >= 0';
    ELSIF NOT coalesce(NEW.input_tokens >= 0, true) THEN
        v_constraint := 'runs_input_tokens_valid'; v_column := 'input_tokens';
        v_value := NEW.input_tokens::text; v_rule := 'a token count >= 0';
    ELSIF NOT coalesce(NEW.output_tokens >= 0, true) THEN
        v_constraint := 'runs_output_tokens_valid'; v_column := 'output_tokens';
        v_value := NEW.output_tokens::text; v_rule := 'a token count >= 0';
    ELSIF TG_OP = 'INSERT' OR OLD.state = NEW.state
          OR (OLD.state = 'pending' AND NEW.state IN ('running', 'failed', 'cancelled'))
          OR (OLD.state = 'running' AND NEW.state IN ('completed', 'failed', 'cancelled')) THEN
        RETURN NEW;
    ELSE
        -- Terminal states are final (V001's pgcrew.check_run_transition, unchanged).
        RAISE EXCEPTION 'illegal run state transition for %: % -> %', OLD.id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation', HINT = 'pgcrew_illegal_transition';
    END IF;
    RAISE EXCEPTION 'new row for relation "runs" violates check constraint "%": % must be %, got %',
        v_constraint, v_column, v_rule, v_value
        USING ERRCODE = 'check_violation', CONSTRAINT = v_constraint, SCHEMA = 'pgcrew',
              TABLE = 'runs', COLUMN = v_column,
              DETAIL = format('run %s', NEW.id);
END $$;
REVOKE ALL ON FUNCTION pgcrew.check_run_row() FROM PUBLIC;

-- One BEFORE trigger: the transition check of V001 and the value checks.
DROP TRIGGER runs_check_transition ON pgcrew.runs;
CREATE TRIGGER runs_check_row
    BEFORE INSERT OR UPDATE OF state, ledger_format, cost_usd, budget_usd_limit, budget_spent_usd,
                               budget_reserved_usd, input_tokens, output_tokens
    ON pgcrew.runs
    FOR EACH ROW EXECUTE FUNCTION pgcrew.check_run_row();
DROP FUNCTION pgcrew.check_run_transition();

ALTER TABLE pgcrew.runs
    DROP CONSTRAINT runs_state_check,
    DROP CONSTRAINT runs_ledger_format_check,
    DROP CONSTRAINT runs_cost_usd_valid,
    DROP CONSTRAINT runs_budget_usd_limit_valid,
    DROP CONSTRAINT runs_budget_spent_usd_valid,
    DROP CONSTRAINT runs_budget_reserved_usd_valid,
    DROP CONSTRAINT runs_input_tokens_valid,
    DROP CONSTRAINT runs_output_tokens_valid;
