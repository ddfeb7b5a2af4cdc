-- `pgcrew bench agents`: report this backend's pending statistics at the end of this statement,
-- so the next sample counts the probe's own transactions.
SELECT pg_stat_force_next_flush()
