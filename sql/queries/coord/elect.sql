-- Take or renew the lease `$1` for `$2` for `$3` microseconds (database time). It succeeds only
-- when the lease is ours or has expired; otherwise it returns nothing. The fencing term changes
-- whenever the holder changes and comes from a sequence, so it strictly increases even across
-- resignations (which delete the row). `nextval` is only evaluated when a new term is actually
-- granted, so renewals and failed attempts do not consume terms.
WITH renewed AS (
    UPDATE pgcrew.leader AS l
    SET leader_id = $2,
        term = CASE WHEN l.leader_id = $2 AND l.expires_at > now() THEN l.term
                    ELSE nextval('pgcrew.leader_term_seq') END,
        elected_at = CASE WHEN l.leader_id = $2 AND l.expires_at > now() THEN l.elected_at
                          ELSE now() END,
        expires_at = now() + $3::int8 * interval '1 microsecond'
    WHERE l.name = $1 AND (l.leader_id = $2 OR l.expires_at <= now())
    RETURNING l.term, l.elected_at
), inserted AS (
    INSERT INTO pgcrew.leader (name, leader_id, term, elected_at, expires_at)
    SELECT $1, $2, nextval('pgcrew.leader_term_seq'), now(), now() + $3::int8 * interval '1 microsecond'
    WHERE NOT EXISTS (SELECT 1 FROM pgcrew.leader WHERE name = $1)
    ON CONFLICT (name) DO NOTHING
    RETURNING term, elected_at
)
SELECT term, elected_at FROM renewed
UNION ALL
SELECT term, elected_at FROM inserted
