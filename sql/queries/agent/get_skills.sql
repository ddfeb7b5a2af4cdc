-- The skill definitions named in $1.
SELECT name, description, instructions, tools
  FROM pgcrew.skills WHERE name = ANY($1::text[])
 ORDER BY name
