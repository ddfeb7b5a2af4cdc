-- pgcrew doctor: stuck runs (the pgcrew.stuck_runs view), oldest first, with the total count.
SELECT s.run_id,
       s.tenant_id,
       s.agent_name,
       s.state,
       s.reason,
       extract(epoch FROM s.age)::float8 AS age_s,
       count(*) OVER () AS total
  FROM pgcrew.stuck_runs s
 ORDER BY s.age DESC, s.run_id
 LIMIT $1
