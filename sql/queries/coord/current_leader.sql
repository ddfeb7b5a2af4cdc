SELECT name, leader_id, term, elected_at, expires_at, expires_at > now() AS valid,
       (extract(epoch FROM expires_at - now()) * 1000)::int8 AS remaining_ms
FROM pgcrew.leader
ORDER BY name
