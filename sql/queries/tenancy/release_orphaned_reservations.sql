-- Maintenance: release reservations whose instance is gone or that are older than $1 µs,
-- at most $2 per pass. Rows being settled right now are skipped (SKIP LOCKED).
WITH victims AS (
    SELECT b.id
    FROM pgcrew.budget_reservations b
    WHERE (b.instance_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM pgcrew.instances i WHERE i.id = b.instance_id))
       OR b.created_at < now() - $1::int8 * interval '1 microsecond'
    ORDER BY b.created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), rel AS (
    DELETE FROM pgcrew.budget_reservations b
    USING victims v
    WHERE b.id = v.id
    RETURNING b.id, b.tenant_id, b.run_id, b.instance_id, b.amount_usd
), by_tenant AS (
    SELECT rel.tenant_id, sum(rel.amount_usd) AS amount FROM rel GROUP BY rel.tenant_id
), t AS (
    UPDATE pgcrew.tenants t
    SET reserved_usd = t.reserved_usd - bt.amount, updated_at = now()
    FROM by_tenant bt
    WHERE t.id = bt.tenant_id
    RETURNING t.id
), by_run AS (
    SELECT rel.run_id, sum(rel.amount_usd) AS amount FROM rel WHERE rel.run_id IS NOT NULL GROUP BY rel.run_id
), r AS (
    UPDATE pgcrew.runs r
    SET budget_reserved_usd = r.budget_reserved_usd - br.amount
    FROM by_run br
    WHERE r.id = br.run_id
    RETURNING r.id
)
SELECT rel.id, rel.tenant_id, rel.instance_id, rel.amount_usd::float8 AS amount_usd,
       (SELECT count(*) FROM t) AS tenants_updated, (SELECT count(*) FROM r) AS runs_updated
FROM rel
