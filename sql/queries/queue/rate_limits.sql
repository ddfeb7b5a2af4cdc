-- Every rate limit (V028) with the tokens its bucket holds now.
SELECT l.scope, l.name, l.per_second, l.burst, pgcrew.rate_tokens(l) AS tokens
  FROM pgcrew.rate_limits l ORDER BY l.scope, l.name
