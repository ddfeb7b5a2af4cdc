-- Release a reservation without charging anything (the call failed before costing anything).
WITH rel AS (
    DELETE FROM pgcrew.budget_reservations
    WHERE id = $1 AND tenant_id = $2
    RETURNING tenant_id, run_id, amount_usd
), t AS (
    UPDATE pgcrew.tenants t
    SET reserved_usd = t.reserved_usd - rel.amount_usd, updated_at = now()
    FROM rel
    WHERE t.id = rel.tenant_id
    RETURNING t.id
), r AS (
    UPDATE pgcrew.runs r
    SET budget_reserved_usd = r.budget_reserved_usd - rel.amount_usd
    FROM rel
    WHERE r.id = rel.run_id
    RETURNING r.id
)
SELECT (SELECT count(*) FROM rel) AS released, (SELECT count(*) FROM t) AS tenants, (SELECT count(*) FROM r) AS runs
