-- A task's parents (the ids it depends on, $2) and children (tasks depending on $1).
SELECT 'parent' AS relation, id, kind, state FROM pgcrew.tasks WHERE id = ANY($2::bigint[])
UNION ALL
SELECT 'child', id, kind, state FROM pgcrew.tasks WHERE depends_on @> ARRAY[$1::bigint]
ORDER BY relation DESC, id
