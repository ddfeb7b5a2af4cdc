-- The names in $1 that are not registered tools, in the order given.
SELECT t.name
  FROM unnest($1::text[]) WITH ORDINALITY AS t(name, i)
 WHERE NOT EXISTS (SELECT 1 FROM pgcrew.tools WHERE tools.name = t.name)
 ORDER BY t.i
