-- Settle a cost in the caller's transaction: release the reservation (if $1 names one that still
-- exists), add the cost to the tenant's and the run's spend and insert the cost entry, in one
-- statement. The cost is rounded once so that sum(cost_entries.cost_usd) = spent_usd exactly;
-- NaN, infinite or negative costs and negative token counts raise PC030 (pgcrew.money_amount /
-- pgcrew.token_count) and nothing is written.
-- A cost is charged in full even when it takes spend past a limit (it was really spent); such a
-- settlement is reported by `tenant_overrun` / `run_overrun` (spend above the limit after a
-- positive cost), the tenant's status becomes EXCEEDED and further reservations are refused.
-- $1 reservation id (nullable), $2 tenant, $3 run (nullable), $4 cost (float8), $5 category,
-- $6 model, $7 step key, $8 prompt tokens, $9 completion tokens.
WITH c AS (
    SELECT pgcrew.money_amount($4::float8, 'cost_usd') AS cost,
           pgcrew.token_count($8::int8, 'prompt_tokens') AS prompt_tokens,
           pgcrew.token_count($9::int8, 'completion_tokens') AS completion_tokens
), rel AS (
    DELETE FROM pgcrew.budget_reservations
    WHERE id = $1::uuid AND tenant_id = $2::text
    RETURNING amount_usd, run_id
), t AS (
    UPDATE pgcrew.tenants t
    SET spent_usd = t.spent_usd + c.cost,
        reserved_usd = t.reserved_usd - coalesce((SELECT sum(rel.amount_usd) FROM rel), 0),
        updated_at = now()
    FROM c
    WHERE t.id = $2::text
    RETURNING t.spent_usd, t.reserved_usd, t.budget_status, t.budget_usd_limit
), r AS (
    UPDATE pgcrew.runs r
    SET budget_spent_usd = r.budget_spent_usd + c.cost,
        budget_reserved_usd = r.budget_reserved_usd
            - coalesce((SELECT sum(rel.amount_usd) FROM rel WHERE rel.run_id = r.id), 0)
    FROM c
    WHERE r.id = $3::uuid AND r.tenant_id = $2::text
    RETURNING r.id, r.budget_spent_usd, r.budget_usd_limit
), e AS (
    INSERT INTO pgcrew.cost_entries (tenant_id, run_id, category, model, step_key, prompt_tokens,
                                     completion_tokens, cost_usd, reservation_id)
    SELECT $2::text, (SELECT r.id FROM r), $5::text, $6::text, $7::text, c.prompt_tokens,
           c.completion_tokens, c.cost, $1::uuid
    FROM c, t
    RETURNING id, cost_usd
)
SELECT e.id AS entry_id,
       e.cost_usd::float8 AS cost_usd,
       (SELECT count(*) FROM rel) AS released,
       t.spent_usd::float8 AS spent_usd,
       t.reserved_usd::float8 AS reserved_usd,
       t.budget_status,
       t.budget_usd_limit::float8 AS tenant_limit_usd,
       (e.cost_usd > 0 AND t.budget_usd_limit IS NOT NULL
        AND t.spent_usd > t.budget_usd_limit) AS tenant_overrun,
       (SELECT r.budget_usd_limit::float8 FROM r) AS run_limit_usd,
       (SELECT r.budget_spent_usd::float8 FROM r) AS run_spent_usd,
       coalesce((SELECT e.cost_usd > 0 AND r.budget_usd_limit IS NOT NULL
                        AND r.budget_spent_usd > r.budget_usd_limit FROM r), false) AS run_overrun
FROM e, t
