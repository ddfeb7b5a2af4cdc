-- Inside a maintenance transaction: hold the leader row so no one can take the lease until we
-- commit, and check that our term is still current and unexpired.
SELECT 1 FROM pgcrew.leader
WHERE name = $1 AND leader_id = $2 AND term = $3 AND expires_at > now()
FOR SHARE
