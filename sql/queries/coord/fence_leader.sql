-- Inside a maintenance transaction: hold the leader row so no one can take the lease until we
-- commit, and check that our term is still current and unexpired.
-- The transaction may then sit idle for at most $4 (the leader TTL): a leader cut off from the
-- server inside it (a network partition: its connection stays open on the server for as long
-- as TCP keepalive takes, hours) would otherwise hold the row, and keep every other instance
-- from taking the expired lease, until then. Past it the server ends the session.
SELECT set_config('idle_in_transaction_session_timeout', $4, true)
FROM pgcrew.leader
WHERE name = $1 AND leader_id = $2 AND term = $3 AND expires_at > now()
FOR SHARE
