-- pgcrew doctor: how many tenants there are, and those with no budget limit. The built-in
-- `default` tenant counts only once it is used (it has runs or cost entries).
SELECT (SELECT count(*) FROM pgcrew.tenants) AS total,
       array(SELECT t.id
               FROM pgcrew.tenants t
              WHERE t.budget_usd_limit IS NULL
                AND (t.id <> 'default'
                     OR EXISTS (SELECT 1 FROM pgcrew.runs r WHERE r.tenant_id = t.id)
                     OR EXISTS (SELECT 1 FROM pgcrew.cost_entries c WHERE c.tenant_id = t.id))
              ORDER BY t.id) AS unlimited
