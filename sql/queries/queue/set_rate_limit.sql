-- Set a rate limit (V028): scope $1 (queue, kind, tenant), name $2, $3 per second, burst $4
-- (NULL: one second's worth). PC103: invalid.
SELECT pgcrew.set_rate_limit($1, $2, $3, $4)
