-- One coordination statement per election attempt (issue #22): take or renew the lease `$1` for
-- instance `$2` for `$3` microseconds (database time), refresh the instance's heartbeat, and,
-- when someone else holds the lease, say who and for how long.
-- Columns: ours (we hold the lease now), term (ours, or the holder's), leader_id (the holder,
-- when not ours), remaining_us (microseconds until the holder's lease expires, when not ours),
-- beat (our instance row exists and was refreshed; false: it was removed, re-register).
-- The take/renew is `coord/elect.sql`'s upsert: it succeeds only when the lease is ours or has
-- expired; the fencing term changes whenever the holder changes and comes from a sequence, and
-- `nextval` runs only when a new term is granted.
-- The holder branch reads the row as of the statement's snapshot: if the upsert waited for the
-- row and it changed meanwhile, the expiry read is older than the row's, never later (a lease is
-- only ever extended or replaced by a later one), so the follower tries again too early, never
-- too late.
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
), beat AS (
    UPDATE pgcrew.instances SET last_heartbeat_at = now() WHERE id = $2
    RETURNING 1
), outcome AS (
    SELECT true AS ours, term, NULL::text AS leader_id, NULL::int8 AS remaining_us FROM renewed
    UNION ALL
    SELECT true, term, NULL, NULL FROM inserted
    UNION ALL
    SELECT false, l.term, l.leader_id,
           (extract(epoch FROM l.expires_at - clock_timestamp()) * 1000000)::int8
      FROM pgcrew.leader l
     WHERE l.name = $1 AND NOT EXISTS (SELECT 1 FROM renewed)
       AND NOT EXISTS (SELECT 1 FROM inserted)
)
SELECT o.ours, o.term, o.leader_id, o.remaining_us, EXISTS (SELECT 1 FROM beat) AS beat
  FROM (SELECT 1) AS one
  LEFT JOIN outcome o ON true
