-- /metrics cluster gauges: instances alive (heartbeat within $1 µs), stuck runs, active runs.
SELECT (SELECT count(*) FROM pgcrew.instances i
         WHERE i.last_heartbeat_at > now() - make_interval(secs => $1::int8 / 1e6))::int8 AS instances,
       (SELECT count(*) FROM pgcrew.stuck_runs)::int8 AS stuck_runs,
       (SELECT count(*) FROM pgcrew.runs r WHERE r.state = 'running')::int8 AS running_runs,
       (SELECT count(*) FROM pgcrew.runs r WHERE r.state = 'pending')::int8 AS pending_runs
