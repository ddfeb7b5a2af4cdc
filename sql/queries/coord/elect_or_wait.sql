-- Take or renew the lease `$1` for `$2` for `$3` microseconds (database time), or, when someone
-- else holds it, say who and for how long: one statement per attempt (issue #22: a follower's
-- attempt used to be two, `elect` then `leader_wait`).
-- Columns: ours (true when we hold the lease now), term, leader_id, remaining_us (microseconds
-- until the holder's lease expires; for a follower only).
-- The take/renew is the upsert of `coord/elect.sql`: it succeeds only when the lease is ours or
-- has expired; the fencing term changes whenever the holder changes and comes from a sequence.
WITH renewed AS (
    UPDATE pgcrew.leader AS l
    SET leader_id = $2,
        term = CASE WHEN l.leader_id = $2 AND l.expires_at > now() THEN l.term
                    ELSE nextval('pgcrew.leader_term_seq') END,
        elected_at = CASE WHEN l.leader_id = $2 AND l.expires_at > now() THEN l.elected_at
                          ELSE now() END,
        expires_at = now() + $3::int8 * interval '1 microsecond'
    WHERE l.name = $1 AND (l.leader_id = $2 OR l.expires_at <= now())
    RETURNING l.term
), inserted AS (
    INSERT INTO pgcrew.leader (name, leader_id, term, elected_at, expires_at)
    SELECT $1, $2, nextval('pgcrew.leader_term_seq'), now(), now() + $3::int8 * interval '1 microsecond'
    WHERE NOT EXISTS (SELECT 1 FROM pgcrew.leader WHERE name = $1)
    ON CONFLICT (name) DO NOTHING
    RETURNING term
)
SELECT true AS ours, term, NULL::text AS leader_id, NULL::int8 AS remaining_us FROM renewed
UNION ALL
SELECT true, term, NULL, NULL FROM inserted
UNION ALL
-- The holder as of the statement's snapshot, when we got nothing.
SELECT false, l.term, l.leader_id,
       (extract(epoch FROM l.expires_at - now()) * 1000000)::int8
  FROM pgcrew.leader l
 WHERE l.name = $1 AND NOT EXISTS (SELECT 1 FROM renewed) AND NOT EXISTS (SELECT 1 FROM inserted)
