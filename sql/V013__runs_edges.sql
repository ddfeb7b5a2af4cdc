-- pgcrew runs at the edges (issue #15): stuck runs are judged by their lease, not their age.

-- A run counts as stuck when it is running with no live lease (expired or none) for longer than
-- an hour, when its lease expired, or when its instance is gone; a run whose lease is being
-- renewed is never listed, however long it has been running.
CREATE OR REPLACE VIEW pgcrew.stuck_runs AS
SELECT r.id AS run_id,
       r.tenant_id,
       r.agent_name,
       r.state,
       r.instance_id,
       r.lease_owner,
       r.lease_expires_at,
       r.started_at,
       now() - coalesce(r.started_at, r.created_at) AS age,
       CASE
           WHEN r.state = 'running' AND r.lease_expires_at < now() THEN 'run lease expired'
           WHEN r.state = 'running' AND r.instance_id IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM pgcrew.instances i WHERE i.id = r.instance_id) THEN 'instance gone'
           WHEN r.state = 'running' THEN 'running longer than 1 hour without a lease'
           ELSE 'pending longer than 1 hour'
       END AS reason
FROM pgcrew.runs r
WHERE (r.state = 'running'
       AND (r.lease_expires_at IS NULL OR r.lease_expires_at <= now())
       AND (r.started_at < now() - interval '1 hour'
            OR r.lease_expires_at < now()
            OR (r.instance_id IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM pgcrew.instances i WHERE i.id = r.instance_id))))
   OR (r.state = 'pending' AND r.created_at < now() - interval '1 hour');
