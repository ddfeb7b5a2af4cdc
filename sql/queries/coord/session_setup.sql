-- Once per coordination session (the LISTEN connection, or the poll-only coordination
-- connection): a renewal blocked on the leader row (held FOR SHARE by the leader's own
-- maintenance step) fails after this long and is retried, instead of holding up the heartbeats
-- queued behind it on the same connection.
SELECT set_config('lock_timeout', $1, false)
