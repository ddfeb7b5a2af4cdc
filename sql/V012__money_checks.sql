-- pgcrew V012: the database itself refuses NaN, infinite and negative money and token counts,
-- whoever writes (issue #15).
--
-- PostgreSQL's numeric NaN sorts ABOVE every number, so the older `CHECK (x >= 0)` constraints
-- let NaN through: one NaN settlement made `spent_usd` NaN, the tenant EXCEEDED for ever and
-- every reservation refused. (Infinity cannot be stored in a numeric(20, 10) column, but the
-- constraints below say so explicitly.)
--
-- 1. `pgcrew.money_amount(float8, what)` / `pgcrew.token_count(int8, what)`: the conversions the
--    tenancy queries use; they raise SQLSTATE PC030 with a message naming the value.
-- 2. Repair of rows already holding invalid values (logged in `pgcrew.money_repairs`):
--    * a cost entry with an invalid cost is set to 0 (the real cost cannot be known from the
--      database; its tokens are kept so an operator can re-price it);
--    * a reservation with an invalid amount is released (deleted), as maintenance would;
--    * an invalid tenant `spent_usd` is recomputed as the sum of its cost entries, an invalid
--      `reserved_usd` (or that of a tenant with an invalid reservation) as the sum of its valid
--      open reservations; the same for a run's `budget_spent_usd` / `budget_reserved_usd`, and an
--      invalid run `cost_usd` becomes the sum of the run's cost entries;
--    * a negative run `input_tokens` / `output_tokens` becomes the sum of the run's cost entries'
--      prompt / completion tokens.
--    Valid rows are not touched. The budget status trigger recomputes each repaired tenant's status.
-- 3. CHECK constraints on every money and token column, added NOT VALID and then VALIDATEd
--    (the repair above makes validation succeed).

-- ---------------------------------------------------------------------------------------------
-- 1. Conversions with clear errors
-- ---------------------------------------------------------------------------------------------

-- A USD amount from a float8: NULL stays NULL; NaN, ±Infinity, negative or too large (numeric(20,
-- 10) holds less than 1e10) raise PC030; otherwise rounded once to 10 decimals.
CREATE FUNCTION pgcrew.money_amount(v float8, what text) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF v IS NULL THEN
        RETURN NULL;
    END IF;
    IF v = 'NaN'::float8 OR v = 'Infinity'::float8 OR v = '-Infinity'::float8 OR v < 0 THEN
        RAISE EXCEPTION '% must be a finite, non-negative USD amount, got %', what, v
            USING ERRCODE = 'PC030',
                  HINT = 'pgcrew stores no NaN, infinite or negative money; pass an amount such as 0.25';
    END IF;
    IF v >= 1e10 THEN
        RAISE EXCEPTION '% is too large: % USD (at most 9999999999.9999999999)', what, v
            USING ERRCODE = 'PC030';
    END IF;
    RETURN round(v::numeric, 10);
END $$;

-- A token count: NULL stays NULL; negative raises PC030.
CREATE FUNCTION pgcrew.token_count(v bigint, what text) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF v < 0 THEN
        RAISE EXCEPTION '% must be a non-negative token count, got %', what, v
            USING ERRCODE = 'PC030';
    END IF;
    RETURN v;
END $$;

-- True for a storable amount: not NaN, not ±Infinity, not negative (NULL: true, as in a CHECK).
CREATE FUNCTION pgcrew.is_valid_money(v numeric) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT v IS NULL OR (v <> 'NaN'::numeric AND v >= 0 AND v < 'Infinity'::numeric)
$$;

-- Only the pgcrew owner's queries use these (tenant roles and other roles do not need them).
REVOKE ALL ON FUNCTION pgcrew.money_amount(float8, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgcrew.token_count(bigint, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgcrew.is_valid_money(numeric) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- 2. Repair (a no-op on a healthy database)
-- ---------------------------------------------------------------------------------------------

-- What the repair changed, for the operator (not tenant-scoped: not granted to tenant roles).
CREATE TABLE pgcrew.money_repairs (
    id          bigserial PRIMARY KEY,
    table_name  text NOT NULL,
    row_key     text NOT NULL,
    column_name text NOT NULL,
    old_value   text,
    new_value   text,
    action      text NOT NULL,
    repaired_at timestamptz NOT NULL DEFAULT now()
);

-- Cost entries with an invalid cost: 0.
WITH bad AS (
    SELECT id, cost_usd FROM pgcrew.cost_entries
    WHERE NOT pgcrew.is_valid_money(cost_usd)
), fixed AS (
    UPDATE pgcrew.cost_entries c SET cost_usd = 0 FROM bad WHERE c.id = bad.id
    RETURNING c.id
)
INSERT INTO pgcrew.money_repairs (table_name, row_key, column_name, old_value, new_value, action)
SELECT 'cost_entries', bad.id::text, 'cost_usd', bad.cost_usd::text, '0',
       'invalid cost set to 0 (tokens kept for re-pricing)'
FROM bad JOIN fixed ON fixed.id = bad.id;

-- Cost entries with negative token counts: 0.
WITH bad AS (
    SELECT id, prompt_tokens, completion_tokens FROM pgcrew.cost_entries
    WHERE prompt_tokens < 0 OR completion_tokens < 0
), fixed AS (
    UPDATE pgcrew.cost_entries c
    SET prompt_tokens = greatest(c.prompt_tokens, 0), completion_tokens = greatest(c.completion_tokens, 0)
    FROM bad WHERE c.id = bad.id
    RETURNING c.id
)
INSERT INTO pgcrew.money_repairs (table_name, row_key, column_name, old_value, new_value, action)
SELECT 'cost_entries', bad.id::text, 'prompt_tokens/completion_tokens',
       bad.prompt_tokens || '/' || bad.completion_tokens,
       greatest(bad.prompt_tokens, 0) || '/' || greatest(bad.completion_tokens, 0),
       'negative token count set to 0'
FROM bad JOIN fixed ON fixed.id = bad.id;

-- Tenants.
WITH bad AS (
    SELECT t.id, t.spent_usd, t.reserved_usd,
           NOT pgcrew.is_valid_money(t.spent_usd) AS fix_spent,
           (NOT pgcrew.is_valid_money(t.reserved_usd)
            OR EXISTS (SELECT 1 FROM pgcrew.budget_reservations b
                        WHERE b.tenant_id = t.id AND NOT pgcrew.is_valid_money(b.amount_usd))) AS fix_reserved
    FROM pgcrew.tenants t
), todo AS (
    SELECT bad.*,
           (SELECT coalesce(sum(c.cost_usd), 0) FROM pgcrew.cost_entries c
             WHERE c.tenant_id = bad.id) AS new_spent,
           (SELECT coalesce(sum(r.amount_usd), 0) FROM pgcrew.budget_reservations r
             WHERE r.tenant_id = bad.id AND pgcrew.is_valid_money(r.amount_usd)) AS new_reserved
    FROM bad WHERE bad.fix_spent OR bad.fix_reserved
), fixed AS (
    UPDATE pgcrew.tenants t
    SET spent_usd = CASE WHEN todo.fix_spent THEN todo.new_spent ELSE t.spent_usd END,
        reserved_usd = CASE WHEN todo.fix_reserved THEN todo.new_reserved ELSE t.reserved_usd END,
        updated_at = now()
    FROM todo WHERE t.id = todo.id
    RETURNING t.id
)
INSERT INTO pgcrew.money_repairs (table_name, row_key, column_name, old_value, new_value, action)
SELECT 'tenants', todo.id, x.col, x.old, x.new, x.action
FROM todo
JOIN fixed ON fixed.id = todo.id
CROSS JOIN LATERAL (VALUES
    ('spent_usd', todo.spent_usd::text, todo.new_spent::text, todo.fix_spent,
     'recomputed as the sum of the tenant''s cost entries'),
    ('reserved_usd', todo.reserved_usd::text, todo.new_reserved::text, todo.fix_reserved,
     'recomputed as the sum of the tenant''s open reservations')
) AS x(col, old, new, needed, action)
WHERE x.needed;

-- Runs.
WITH bad AS (
    SELECT r.id, r.budget_spent_usd, r.budget_reserved_usd, r.cost_usd, r.input_tokens, r.output_tokens,
           NOT pgcrew.is_valid_money(r.budget_spent_usd) AS fix_spent,
           (NOT pgcrew.is_valid_money(r.budget_reserved_usd)
            OR EXISTS (SELECT 1 FROM pgcrew.budget_reservations b
                        WHERE b.run_id = r.id AND NOT pgcrew.is_valid_money(b.amount_usd))) AS fix_reserved,
           NOT pgcrew.is_valid_money(r.cost_usd) AS fix_cost,
           r.input_tokens < 0 AS fix_input,
           r.output_tokens < 0 AS fix_output
    FROM pgcrew.runs r
), todo AS (
    SELECT bad.*, c.cost, c.prompt, c.completion,
           (SELECT coalesce(sum(b.amount_usd), 0) FROM pgcrew.budget_reservations b
             WHERE b.run_id = bad.id AND pgcrew.is_valid_money(b.amount_usd)) AS new_reserved
    FROM bad
    CROSS JOIN LATERAL (
        SELECT coalesce(sum(ce.cost_usd), 0) AS cost,
               coalesce(sum(ce.prompt_tokens), 0)::bigint AS prompt,
               coalesce(sum(ce.completion_tokens), 0)::bigint AS completion
        FROM pgcrew.cost_entries ce WHERE ce.run_id = bad.id
    ) c
    WHERE bad.fix_spent OR bad.fix_reserved OR bad.fix_cost OR bad.fix_input OR bad.fix_output
), fixed AS (
    UPDATE pgcrew.runs r
    SET budget_spent_usd = CASE WHEN todo.fix_spent THEN todo.cost ELSE r.budget_spent_usd END,
        budget_reserved_usd = CASE WHEN todo.fix_reserved THEN todo.new_reserved ELSE r.budget_reserved_usd END,
        cost_usd = CASE WHEN todo.fix_cost THEN todo.cost ELSE r.cost_usd END,
        input_tokens = CASE WHEN todo.fix_input THEN todo.prompt ELSE r.input_tokens END,
        output_tokens = CASE WHEN todo.fix_output THEN todo.completion ELSE r.output_tokens END
    FROM todo WHERE r.id = todo.id
    RETURNING r.id
)
INSERT INTO pgcrew.money_repairs (table_name, row_key, column_name, old_value, new_value, action)
SELECT 'runs', todo.id::text, x.col, x.old, x.new, x.action
FROM todo
JOIN fixed ON fixed.id = todo.id
CROSS JOIN LATERAL (VALUES
    ('budget_spent_usd', todo.budget_spent_usd::text, todo.cost::text, todo.fix_spent,
     'recomputed as the sum of the run''s cost entries'),
    ('budget_reserved_usd', todo.budget_reserved_usd::text, todo.new_reserved::text, todo.fix_reserved,
     'recomputed as the sum of the run''s open reservations'),
    ('cost_usd', todo.cost_usd::text, todo.cost::text, todo.fix_cost,
     'recomputed as the sum of the run''s cost entries'),
    ('input_tokens', todo.input_tokens::text, todo.prompt::text, todo.fix_input,
     'recomputed as the sum of the run''s cost entries'' prompt tokens'),
    ('output_tokens', todo.output_tokens::text, todo.completion::text, todo.fix_output,
     'recomputed as the sum of the run''s cost entries'' completion tokens')
) AS x(col, old, new, needed, action)
WHERE x.needed;

-- Reservations with an invalid amount: released (their tenants' and runs' reserved amounts were
-- recomputed above without them).
WITH gone AS (
    DELETE FROM pgcrew.budget_reservations
    WHERE NOT pgcrew.is_valid_money(amount_usd)
    RETURNING id, amount_usd
)
INSERT INTO pgcrew.money_repairs (table_name, row_key, column_name, old_value, new_value, action)
SELECT 'budget_reservations', id::text, 'amount_usd', amount_usd::text, NULL,
       'reservation with an invalid amount released'
FROM gone;

DO $$
DECLARE
    n bigint;
BEGIN
    SELECT count(*) INTO n FROM pgcrew.money_repairs;
    IF n > 0 THEN
        RAISE WARNING 'pgcrew V012 repaired % invalid money/token values: see pgcrew.money_repairs', n;
    END IF;
END $$;

-- ---------------------------------------------------------------------------------------------
-- 3. Constraints: NOT VALID first (no scan under the exclusive lock), then VALIDATE. The
--    expressions are inline (no function call), so any role allowed to write these tables can,
--    whatever its EXECUTE privileges. Two comparisons per column: numeric NaN sorts above every
--    number *and* above Infinity, so `x >= 0 AND x < 'Infinity'` refuses NaN, ±Infinity and
--    negatives (`x >= 0` alone accepts NaN). They are evaluated on every UPDATE of the row,
--    ledger head updates on each append included (measured: the earlier three-comparison form
--    plus the older constraints cost 13 % of the append rate), so the older constraints they
--    subsume are dropped.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE pgcrew.tenants
    ADD CONSTRAINT tenants_spent_usd_valid CHECK (spent_usd >= 0 AND spent_usd < 'Infinity'::numeric) NOT VALID,
    ADD CONSTRAINT tenants_reserved_usd_valid CHECK (reserved_usd >= 0 AND reserved_usd < 'Infinity'::numeric) NOT VALID,
    ADD CONSTRAINT tenants_budget_usd_limit_valid CHECK (budget_usd_limit >= 0 AND budget_usd_limit < 'Infinity'::numeric) NOT VALID;

ALTER TABLE pgcrew.runs
    ADD CONSTRAINT runs_cost_usd_valid CHECK (cost_usd >= 0 AND cost_usd < 'Infinity'::numeric) NOT VALID,
    ADD CONSTRAINT runs_budget_usd_limit_valid CHECK (budget_usd_limit >= 0 AND budget_usd_limit < 'Infinity'::numeric) NOT VALID,
    ADD CONSTRAINT runs_budget_spent_usd_valid CHECK (budget_spent_usd >= 0 AND budget_spent_usd < 'Infinity'::numeric) NOT VALID,
    ADD CONSTRAINT runs_budget_reserved_usd_valid CHECK (budget_reserved_usd >= 0 AND budget_reserved_usd < 'Infinity'::numeric) NOT VALID,
    ADD CONSTRAINT runs_input_tokens_valid CHECK (input_tokens >= 0) NOT VALID,
    ADD CONSTRAINT runs_output_tokens_valid CHECK (output_tokens >= 0) NOT VALID;

ALTER TABLE pgcrew.budget_reservations
    ADD CONSTRAINT budget_reservations_amount_usd_valid CHECK (amount_usd >= 0 AND amount_usd < 'Infinity'::numeric) NOT VALID;

ALTER TABLE pgcrew.cost_entries
    ADD CONSTRAINT cost_entries_cost_usd_valid CHECK (cost_usd >= 0 AND cost_usd < 'Infinity'::numeric) NOT VALID,
    ADD CONSTRAINT cost_entries_tokens_valid CHECK (prompt_tokens >= 0 AND completion_tokens >= 0) NOT VALID;

ALTER TABLE pgcrew.tenants VALIDATE CONSTRAINT tenants_spent_usd_valid;
ALTER TABLE pgcrew.tenants VALIDATE CONSTRAINT tenants_reserved_usd_valid;
ALTER TABLE pgcrew.tenants VALIDATE CONSTRAINT tenants_budget_usd_limit_valid;
ALTER TABLE pgcrew.runs VALIDATE CONSTRAINT runs_cost_usd_valid;
ALTER TABLE pgcrew.runs VALIDATE CONSTRAINT runs_budget_usd_limit_valid;
ALTER TABLE pgcrew.runs VALIDATE CONSTRAINT runs_budget_spent_usd_valid;
ALTER TABLE pgcrew.runs VALIDATE CONSTRAINT runs_budget_reserved_usd_valid;
ALTER TABLE pgcrew.runs VALIDATE CONSTRAINT runs_input_tokens_valid;
ALTER TABLE pgcrew.runs VALIDATE CONSTRAINT runs_output_tokens_valid;
ALTER TABLE pgcrew.budget_reservations VALIDATE CONSTRAINT budget_reservations_amount_usd_valid;
ALTER TABLE pgcrew.cost_entries VALIDATE CONSTRAINT cost_entries_cost_usd_valid;
ALTER TABLE pgcrew.cost_entries VALIDATE CONSTRAINT cost_entries_tokens_valid;

-- The older constraints the ones above subsume (V001, V004).
ALTER TABLE pgcrew.tenants
    DROP CONSTRAINT tenants_spent_usd_check,
    DROP CONSTRAINT tenants_reserved_usd_check,
    DROP CONSTRAINT tenants_budget_usd_limit_check,
    DROP CONSTRAINT tenants_budget_finite_check;
ALTER TABLE pgcrew.runs
    DROP CONSTRAINT runs_budget_usd_limit_check,
    DROP CONSTRAINT runs_budget_spent_usd_check,
    DROP CONSTRAINT runs_budget_reserved_usd_check;
