-- Take or renew the lease `$1` for `$2`: succeeds only when the lease is ours or has expired
-- (database time). The fencing term changes (from a sequence, so it never repeats) whenever
-- the holder changes. Returns nothing when another holder's lease is still valid.
INSERT INTO pgcrew.leader AS l (name, leader_id, term, elected_at, expires_at)
VALUES ($1, $2, nextval('pgcrew.leader_term_seq'), now(), now() + $3::int8 * interval '1 microsecond')
ON CONFLICT (name) DO UPDATE
SET leader_id = EXCLUDED.leader_id,
    term = CASE WHEN l.leader_id = EXCLUDED.leader_id AND l.expires_at > now() THEN l.term ELSE EXCLUDED.term END,
    elected_at = CASE WHEN l.leader_id = EXCLUDED.leader_id AND l.expires_at > now() THEN l.elected_at ELSE now() END,
    expires_at = EXCLUDED.expires_at
WHERE l.leader_id = EXCLUDED.leader_id OR l.expires_at <= now()
RETURNING term, elected_at
