-- Remove a rate limit (V028).
DELETE FROM pgcrew.rate_limits WHERE scope = $1 AND name = $2
