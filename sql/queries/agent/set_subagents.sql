-- Replace an agent's sub-agents (refused with PC070 when the list closes a cycle).
SELECT pgcrew.set_subagents($1::text, $2::text[], $3::float8[])
