-- pgcrew doctor: the lease $1, whether it is valid, and whether its holder is registered.
SELECT l.leader_id,
       l.term,
       l.expires_at > now() AS valid,
       (extract(epoch FROM l.expires_at - now()) * 1000)::int8 AS remaining_ms,
       EXISTS (SELECT 1 FROM pgcrew.instances i WHERE i.id = l.leader_id) AS registered
  FROM pgcrew.leader l
 WHERE l.name = $1
