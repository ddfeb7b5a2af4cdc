-- Delete leader terms taken more than $1 microseconds ago, at most $2, never a lease's newest.
DELETE FROM pgcrew.leader_terms WHERE (name, term) IN (
    SELECT t.name, t.term FROM pgcrew.leader_terms t
     WHERE t.acquired_at < now() - $1::int8 * interval '1 microsecond'
       AND t.term < (SELECT max(n.term) FROM pgcrew.leader_terms n WHERE n.name = t.name)
     ORDER BY t.acquired_at
     LIMIT $2)
